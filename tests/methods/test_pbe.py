"""PBE: removes BadNets and Blend backdoors on digits without clean data and keeps its trusted subset nearly
clean; similarity scoring, subset growth and the top-rate ramp; resume; bad configs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from methods.core.context import LocalContext, StopRun
from methods.core.metrics import POOL_CLEAN, POOL_UNCERTAIN
from methods.core.method import get_method
from methods.defenses.pbe import (
    PBEConfig,
    logit_similarity,
    random_mask,
    top_fraction_mask,
    trusted_pools,
)

PRESET = yaml.safe_load((Path(__file__).resolve().parents[2] / "search_spaces/presets/digits/pbe.yaml").read_text())
SPLIT_KEYS = {"split_clean_precision", "split_clean_recall", "pool_clean_size", "pool_clean_poisoned_frac"}


def run_pbe(backdoor, stop_after_step=None, checkpoint=None, **overrides):
    spec = get_method("pbe")
    assert spec.splits_samples
    ctx = LocalContext(backdoor_provider=lambda: backdoor, stop_after_step=stop_after_step, checkpoint=checkpoint)
    result = spec.run(ctx, spec.make_config({**PRESET, **overrides}))
    return ctx, result


@pytest.mark.slow
def test_pbe_without_clean_data_removes_the_backdoor_and_filters_the_poison(digits_backdoor):
    before = digits_backdoor.metrics
    ctx, result = run_pbe(digits_backdoor)
    after = result.metrics
    cfg = PBEConfig.from_dict(PRESET)
    actual = digits_backdoor.data.poison_fraction
    trusted_frac = after["pool_clean_poisoned_frac"]
    print(f"\npbe {digits_backdoor.attack}: test ACC {before['test_acc']:.3f} -> {after['test_acc']:.3f}, "
          f"ASR {before['test_asr']:.3f} -> {after['test_asr']:.3f} (val ACC {after['val_acc']:.3f}, "
          f"ASR {after['val_asr']:.3f}); trusted subset {int(after['pool_clean_size'])} images, "
          f"{trusted_frac:.3f} poisoned vs {actual:.3f} in the training set; score AUROC {after['split_auroc']:.3f}")
    for step, m in ctx.reports:
        if step % cfg.epochs_per_step == 0:
            print(f"  step {step}: val ACC {m['val_acc']:.3f} ASR {m['val_asr']:.3f}, trusted {int(m['pool_clean_size'])} "
                  f"({m['pool_clean_poisoned_frac']:.3f} poisoned), AUROC {m['split_auroc']:.3f}")
    assert before["test_asr"] >= 0.9
    assert after["test_asr"] <= 0.10
    assert after["test_acc"] >= before["test_acc"] - 0.03
    assert trusted_frac < 0.5 * actual

    assert [s for s, _ in ctx.reports] == list(range(1, cfg.n_steps * cfg.epochs_per_step + 1))
    assert all(SPLIT_KEYS <= set(m) for _, m in ctx.reports)
    n = len(digits_backdoor.data.y_train)
    sizes = [int(m["pool_clean_size"]) for s, m in ctx.reports if s % cfg.epochs_per_step == 1]
    assert sizes == [round(cfg.init_fraction * n)] + [round(r * n) for r in cfg.rates()]
    scores = ctx.hand_offs["scores"]
    assert len(scores["score"]) == n and set(scores["pool"]) == {"clean", "uncertain"}
    assert (scores["pool"] == "clean").sum() == after["pool_clean_size"]
    assert after["split_auroc"] > 0.5, "poisoned images score higher (1 - similarity)"


def test_similarity_is_half_plus_half_cosine_of_raw_logits():
    ref = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [2.0, 1.0]])
    cur = torch.tensor([[3.0, 0.0], [-1.0, 0.0], [0.0, 5.0], [2.0, 1.0]])
    sim = logit_similarity(ref, cur)
    assert torch.allclose(sim, torch.tensor([1.0, 0.0, 0.5, 1.0]), atol=1e-6)
    moved = logit_similarity(torch.tensor([[5.0, 0.0, 0.0]]), torch.tensor([[1.0, 4.0, 0.0]]))
    assert 0.5 < moved.item() < 1.0


def test_the_trusted_subset_is_the_most_similar_fraction():
    sim = torch.tensor([0.9, 0.1, 0.8, 0.8, 0.3, 0.95, 0.2, 0.5, 0.6, 0.7])
    mask = top_fraction_mask(sim, 0.4)
    assert mask.tolist() == [True, False, True, True, False, True, False, False, False, False]
    assert top_fraction_mask(sim, 0.3).tolist() == [True, False, True, False, False, True, False, False, False, False], \
        "ties: the lower index first"
    assert top_fraction_mask(sim, 0.01).sum() == 1 and top_fraction_mask(sim, 1.0).all()
    pools = trusted_pools(mask)
    assert pools[mask].eq(POOL_CLEAN).all() and pools[~mask].eq(POOL_UNCERTAIN).all()


def test_random_initial_subset_is_seeded():
    a = random_mask(1000, 0.05, 7, torch.device("cpu"))
    assert a.sum() == 50 and torch.equal(a, random_mask(1000, 0.05, 7, torch.device("cpu")))
    assert not torch.equal(a, random_mask(1000, 0.05, 8, torch.device("cpu")))


def test_top_rates_list_or_linear_ramp():
    assert PBEConfig().rates() == [0.2, 0.5, 0.7]
    ramp = dict(top_rates=None, top_rate_first=0.2, top_rate_last=0.8)
    assert PBEConfig(n_steps=5, **ramp).rates() == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert PBEConfig(n_steps=3, **ramp).rates() == pytest.approx([0.2, 0.8])
    assert PBEConfig(n_steps=2, **ramp).rates() == [0.8], "a single re-selection uses the last rate"
    assert PBEConfig(n_steps=1, **ramp).rates() == []
    assert PBEConfig(n_steps=1, top_rates=[]).rates() == []


TINY = dict(n_steps=2, epochs_per_step=2, top_rates=[0.3], init_fraction=0.1, adv_steps=1, adv_step_size=None)


@pytest.mark.parametrize("stop", [2, 3])
def test_interrupted_pbe_resumes_bit_identically(badnets_backdoor, stop):
    straight_ctx, straight = run_pbe(badnets_backdoor, **TINY)
    interrupted = LocalContext(backdoor_provider=lambda: badnets_backdoor, stop_after_step=stop)
    spec = get_method("pbe")
    with pytest.raises(StopRun):
        spec.run(interrupted, spec.make_config({**PRESET, **TINY}))
    assert [s for s, _ in interrupted.reports] == list(range(1, stop + 1))
    resumed_ctx, resumed = run_pbe(badnets_backdoor, checkpoint=interrupted.checkpoint, **TINY)
    assert [s for s, _ in resumed_ctx.reports] == list(range(stop + 1, 5))
    for key, value in straight.model_state.items():
        assert torch.equal(value, resumed.model_state[key]), key
    for column in ("score", "pool"):
        assert np.array_equal(straight_ctx.hand_offs["scores"][column], resumed_ctx.hand_offs["scores"][column])
    assert resumed_ctx.reports[-1][1]["pool_clean_size"] == straight_ctx.reports[-1][1]["pool_clean_size"]


def test_resetting_the_optimizer_between_steps_changes_training(badnets_backdoor):
    _, carried = run_pbe(badnets_backdoor, **TINY)
    _, reset = run_pbe(badnets_backdoor, reset_optimizer_each_step=True, **TINY)
    assert any(not torch.equal(v, reset.model_state[k]) for k, v in carried.model_state.items())


@pytest.mark.parametrize(
    "values, field",
    [
        ({"init_fraction": 0.0}, "init_fraction"),
        ({"n_steps": 3}, "top_rates"),
        ({"top_rates": [0.2, 0.0, 0.7]}, "top_rates"),
        ({"top_rates": [0.2, 1.5, 0.7]}, "top_rates"),
        ({"top_rates": None, "top_rate_first": 0.0}, "top_rate_first"),
        ({"top_rates": None, "top_rate_last": 1.2}, "top_rate_last"),
        ({"later_adv_batches": -1}, "later_adv_batches"),
        ({"epochs_per_step": 0}, "epochs_per_step"),
        ({"adv_eps": -0.1}, "adv_eps"),
    ],
)
def test_bad_config_values_name_the_field(values, field):
    with pytest.raises(ValueError, match=field):
        PBEConfig.from_dict(values)
