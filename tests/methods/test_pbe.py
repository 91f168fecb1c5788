"""PBE: removes BadNets and Blend backdoors on digits without clean data and keeps its trusted subset nearly
clean; similarity scoring, subset growth and the top-rate ramp; resume; bad configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from methods.core.blind_signals import label_excess
from methods.core.context import LocalContext
from methods.core.method import get_method
from methods.core.metrics import POOL_CLEAN, POOL_UNCERTAIN
from methods.core.training import derive_seed
from methods.defenses.pbe import (
    PBEConfig,
    clean_originals,
    label_quotas,
    logit_similarity,
    prediction_similarity,
    random_mask,
    top_fraction_mask,
    trusted_pools,
)
from tests.conftest import MAX_MEAN_ACC_LOSS, assert_defended, meets_cell_bar, train_backdoor

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
    print(
        f"\npbe {digits_backdoor.attack}: test ACC {before['test_acc']:.3f} -> {after['test_acc']:.3f}, "
        f"ASR {before['test_asr']:.3f} -> {after['test_asr']:.3f} (val ACC {after['val_acc']:.3f}, "
        f"ASR {after['val_asr']:.3f}); trusted subset {int(after['pool_clean_size'])} images, "
        f"{trusted_frac:.3f} poisoned vs {actual:.3f} in the training set; score AUROC {after['split_auroc']:.3f}"
    )
    for step, m in ctx.reports:
        if step % cfg.epochs_per_step == 0:
            print(
                f"  step {step}: val ACC {m['val_acc']:.3f} ASR {m['val_asr']:.3f}, "
                f"trusted {int(m['pool_clean_size'])} "
                f"({m['pool_clean_poisoned_frac']:.3f} poisoned), AUROC {m['split_auroc']:.3f}"
            )
    assert before["test_asr"] >= 0.9
    assert_defended(f"pbe on {digits_backdoor.attack}", after, before)
    assert trusted_frac < 0.5 * actual

    reruns = int(after["pbe_attempt"])
    assert [s for s, _ in ctx.reports] == list(range(1, (cfg.n_steps + reruns) * cfg.epochs_per_step + 1))
    assert all(SPLIT_KEYS <= set(m) for _, m in ctx.reports)
    n = len(digits_backdoor.data.y_train)
    sizes = [int(m["pool_clean_size"]) for s, m in ctx.reports if s % cfg.epochs_per_step == 1]
    assert sizes == [round(cfg.init_fraction * n)] * (reruns + 1) + [round(r * n) for r in cfg.rates()]
    scores = ctx.hand_offs["scores"]
    assert len(scores["score"]) == n and set(scores["pool"]) == {"clean", "uncertain"}
    assert (scores["pool"] == "clean").sum() == after["pool_clean_size"]
    assert after["split_auroc"] > 0.5, "poisoned images score higher (1 - similarity)"


def test_other_similarity_measures_rank_moved_predictions_lower():
    ref = torch.tensor([[4.0, 0.0, 0.0], [4.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    cur = torch.tensor([[4.0, 0.0, 0.0], [3.0, 1.0, 0.0], [0.0, 4.0, 0.0], [0.0, 3.0, 0.0]])
    kl = prediction_similarity(ref, cur, "kl_softmax")
    assert kl[0].item() == pytest.approx(1.0) and kl[3].item() == pytest.approx(1.0)
    assert 1.0 > kl[1].item() > kl[2].item() > 0.0
    p, q = torch.softmax(ref[1], 0), torch.softmax(cur[1], 0)
    assert kl[1].item() == pytest.approx(torch.exp(-(p * (p / q).log()).sum()).item())
    am = prediction_similarity(ref, cur, "argmax")
    assert am[2].item() < 0.01 < 0.99 < am[1].item() < am[0].item(), "agreement first, then how far the logits moved"
    assert torch.equal(prediction_similarity(ref, cur, "cosine_logits"), logit_similarity(ref, cur))
    for kind in ("cosine_logits", "kl_softmax", "argmax"):
        sim = prediction_similarity(ref, cur, kind)
        assert ((sim >= 0) & (sim <= 1)).all(), kind


def test_step0_radius_and_its_reruns():
    cfg = PBEConfig(adv_eps=0.04, adv_step_size=0.01, step0_adv_eps=0.08, retry_eps_scale=1.5)
    first, second = cfg.step0_config(0), cfg.step0_config(1)
    assert first.adv_eps == pytest.approx(0.08) and first.step_size() == pytest.approx(0.02), "step scales with eps"
    assert second.adv_eps == pytest.approx(0.12) and second.step_size() == pytest.approx(0.03)
    assert PBEConfig(adv_eps=0.04).step0_config(0).adv_eps == pytest.approx(0.04), "default: the later steps' radius"
    assert cfg.adv_eps == 0.04, "the later steps keep theirs"


def test_a_step0_that_fails_on_validation_is_rerun_from_the_infected_model(badnets_backdoor):
    # A threshold of 0 fails any step 0 whose val ASR is not exactly 0, as this tiny one's is not.
    values = dict(TINY, step0_retries=1, step0_max_val_asr=0.0)
    ctx, result = run_pbe(badnets_backdoor, **values)
    cfg = PBEConfig.from_dict({**PRESET, **values})
    per = cfg.epochs_per_step
    reports = dict(ctx.reports)
    assert list(reports) == list(range(1, (cfg.n_steps + 1) * per + 1)), "one extra step 0"
    assert reports[per]["val_asr"] > 0 and reports[per]["pbe_step0_failed"] == 1.0
    assert [reports[s]["pbe_attempt"] for s in reports] == [0.0] * per + [1.0] * (cfg.n_steps * per)
    assert [reports[s]["pbe_step"] for s in reports] == [0.0] * (2 * per) + [1.0] * per
    flags = badnets_backdoor.data.poison_flags
    n = len(flags)
    redraw = random_mask(n, cfg.init_fraction, derive_seed(cfg.seed, "pbe_init_1"), torch.device("cpu"))
    assert not torch.equal(
        redraw, random_mask(n, cfg.init_fraction, derive_seed(cfg.seed, "pbe_init"), torch.device("cpu"))
    )
    assert reports[per]["pbe_next_poisoned_frac"] == pytest.approx(flags[redraw].float().mean().item())
    assert reports[per + 1]["pool_clean_poisoned_frac"] == pytest.approx(flags[redraw].float().mean().item())
    assert "split_auroc" not in reports[per + 1], "the failed attempt's scores are dropped"
    # no rerun left: the second step 0 (still failing at threshold 0) continues to the re-selection
    assert reports[2 * per]["pbe_step0_failed"] == 1.0 and "pbe_step0_failed" not in reports[3 * per]
    # with a bar the tiny step 0 clears, nothing is rerun
    ctx_ok, _ = run_pbe(badnets_backdoor, **dict(values, step0_max_val_asr=1.0))
    assert [s for s, _ in ctx_ok.reports] == list(range(1, cfg.n_steps * per + 1))
    assert dict(ctx_ok.reports)[per]["pbe_step0_failed"] == 0.0


def pbe_outcome(attack: str, seed: int) -> tuple[dict, dict]:
    """(before, after) of the preset on `attack` trained with `seed`, PBE run with the same seed."""
    backdoor = train_backdoor(attack, seed=seed)
    _, result = run_pbe(backdoor, seed=seed)
    before, after = backdoor.metrics, result.metrics
    print(
        f"\npbe {attack} seed {seed}: test ACC {before['test_acc']:.3f} -> {after['test_acc']:.3f}, ASR "
        f"{before['test_asr']:.3f} -> {after['test_asr']:.3f}, step 0 reruns {int(after['pbe_attempt'])}"
    )
    return before, after


@pytest.mark.slow
def test_pbe_does_not_depend_on_its_first_draw():
    # The digits preset was tuned on validation on these seeds (see its comments), where the earlier preset
    # failed on 4 of 5: the bar (conftest's) holds on 4 of 5, and the mean ACC lost over all five within 3 points.
    outcomes = [pbe_outcome("badnets", seed) for seed in range(1, 6)]
    lost = [before["test_acc"] - after["test_acc"] for before, after in outcomes]
    passed = [meets_cell_bar(after, before) for before, after in outcomes]
    assert sum(passed) >= 4 and sum(lost) / len(lost) <= MAX_MEAN_ACC_LOSS, (passed, lost)


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["trojan", "blend"])
def test_pbe_keeps_accuracy_on_a_seed_no_preset_uses(attack):
    before, after = pbe_outcome(attack, 23)
    assert_defended(f"pbe on {attack} seed 23", after, before)


@pytest.mark.slow
def test_the_blind_label_excess_check_fails_the_step0_that_left_the_backdoor():
    # Step 0 alone, unchecked by val ASR. On this seed a 16/255 step 0 leaves the digits BadNets backdoor in place
    # and a 24/255 one erases it (a seed the threshold was measured on, docs/methods.md#pbe); the blind check must
    # tell the two apart from training labels and validation accuracy alone.
    backdoor = train_backdoor("badnets", seed=3)
    outcomes = {}
    for radius in (16, 24):
        ctx, result = run_pbe(
            backdoor, seed=3, n_steps=1, top_rates=[], step0_retries=0, knowledge="blind", step0_adv_eps=radius / 255
        )
        step0 = ctx.reports[-1][1]
        outcomes[radius] = (
            result.metrics["val_asr"],
            step0["val_label_excess"],
            step0["pbe_step0_label_excess_failed"],
        )
    print(f"\nstep 0 on badnets seed 3 (val ASR, label excess, failed): {outcomes}")
    assert outcomes[16][0] >= 0.9 and outcomes[16][2] == 1.0
    assert outcomes[24][0] <= 0.1 and outcomes[24][2] == 0.0
    assert outcomes[24][1] > outcomes[16][1] + 0.3


def test_label_excess_is_the_largest_flip_share_beyond_the_class_val_error():
    train_labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    # label 0 loses 3 of 4 images, label 1 one of 2, label 2 none
    train_predicted = torch.tensor([1, 2, 1, 0, 1, 0, 2, 2])
    val_labels = torch.tensor([0, 0, 1, 1, 2])
    val_predicted = torch.tensor([0, 0, 0, 0, 2])  # class 1 is always wrong on validation
    assert label_excess(train_predicted, train_labels, val_predicted, val_labels, 3) == pytest.approx(0.75)
    assert label_excess(train_predicted, train_labels, val_labels, val_labels, 3) == pytest.approx(0.75)
    # a label without validation images counts its whole flip share; labels nobody carries are skipped
    only_class_0_wrong = (torch.tensor([1, 1]), torch.tensor([0, 0]))
    assert label_excess(train_predicted, train_labels, *only_class_0_wrong, 5) == pytest.approx(0.5)


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
    assert top_fraction_mask(sim, 0.3).tolist() == [
        True,
        False,
        True,
        False,
        False,
        True,
        False,
        False,
        False,
        False,
    ], "ties: the lower index first"
    assert top_fraction_mask(sim, 0.01).sum() == 1 and top_fraction_mask(sim, 1.0).all()
    pools = trusted_pools(mask)
    assert pools[mask].eq(POOL_CLEAN).all() and pools[~mask].eq(POOL_UNCERTAIN).all()


def test_per_label_selection_takes_even_counts_of_each_labels_most_similar():
    assert label_quotas([10, 10, 10], 15) == [5, 5, 5]
    assert label_quotas([2, 50, 50], 40) == [2, 19, 19], "a small label gives all it has, the rest is spread"
    assert label_quotas([118, 114, 231], 300) == [100, 100, 100], "the target's label (poison included) no more"
    assert sum(label_quotas([3, 7, 40, 9], 50)) == 50
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    sim = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.9, 0.8, 0.7, 0.6])
    assert top_fraction_mask(sim, 0.5).tolist() == [False] * 4 + [True] * 4, "globally, label 1 takes everything"
    assert top_fraction_mask(sim, 0.5, labels).tolist() == [False, False, True, True, True, True, False, False]


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


RERUN = dict(TINY, step0_retries=1, step0_max_val_asr=0.0)


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
        ({"similarity": "l2"}, "similarity"),
        ({"step0_adv_eps": 1.5}, "step0_adv_eps"),
        ({"step0_retries": -1}, "step0_retries"),
        ({"step0_max_val_asr": 1.1}, "step0_max_val_asr"),
        ({"retry_eps_scale": 0.5}, "retry_eps_scale"),
        ({"clean_originals": True, "knowledge": "blind"}, "clean_originals"),
    ],
)
def test_bad_config_values_name_the_field(values, field):
    with pytest.raises(ValueError, match=field):
        PBEConfig.from_dict(values)


@pytest.mark.parametrize(
    "values, check",
    [
        ({}, "val_asr"),
        ({"knowledge": "blind"}, "label_excess"),
        ({"knowledge": "blind", "canary_rate": 0.1}, "label_excess"),
        ({"knowledge": "blind", "canary_rate": 0.1, "step0_rule": "canary"}, "canary"),
        ({"knowledge": "blind", "step0_rule": "unchecked"}, "unchecked"),
    ],
)
def test_the_step0_check_follows_knowledge_unless_set(values, check):
    assert PBEConfig.from_dict(values).step0_check() == check


def test_the_canary_check_without_a_canary_is_refused():
    with pytest.raises(ValueError, match="step0_rule: canary .* set canary_rate > 0"):
        PBEConfig.from_dict({"step0_rule": "canary"})


def test_the_val_asr_check_under_blind_knowledge_is_refused_naming_both_fields():
    with pytest.raises(ValueError, match="step0_rule: val_asr .* knowledge: blind"):
        PBEConfig.from_dict({"knowledge": "blind", "step0_rule": "val_asr"})


@pytest.mark.parametrize(
    "rule, flag",
    [
        ({"step0_rule": "unchecked"}, None),
        # no label loses all its images beyond its val error: always failed
        ({"step0_min_label_excess": 1.0}, "pbe_step0_label_excess_failed"),
        ({"canary_rate": 0.1, "step0_rule": "canary"}, "pbe_step0_canary_failed"),
    ],
    ids=["unchecked", "label_excess", "canary"],
)
def test_blind_pbe_never_reads_trigger_or_flag_metrics(badnets_backdoor, oracle_metrics_nan, rule, flag):
    import methods.defenses.pbe as pbe
    import methods.defenses.shared.common as common

    # RERUN's threshold of 0 reruns step 0 under oracle knowledge (test above); blind leaves step 0 unchecked, or
    # checks it on its label excess or on the canary, each failing this tiny step 0: step 0 is rerun once
    values = dict(RERUN, knowledge="blind", **rule)
    ctx, plain = run_pbe(badnets_backdoor, **values)
    cfg = PBEConfig.from_dict({**PRESET, **values})
    steps = (cfg.n_steps + (1 if flag else 0)) * cfg.epochs_per_step
    assert [s for s, _ in ctx.reports] == list(range(1, steps + 1))
    assert not any("pbe_step0_failed" in m for _, m in ctx.reports)
    if flag:
        checked = [m[flag] for _, m in ctx.reports if flag in m]
        assert len(checked) == 2 and checked[0] == 1.0, "the first attempt failed, its rerun was checked too"
    oracle_metrics_nan((common, "evaluate_with_der"), (pbe, "split_metrics"), (common, "split_metrics"))
    poisoned_ctx, poisoned = run_pbe(badnets_backdoor, **values)
    assert all(math.isnan(m["val_asr"]) for s, m in poisoned_ctx.reports if s <= steps)
    for key, value in plain.model_state.items():
        assert torch.equal(value, poisoned.model_state[key]), key


def test_clean_originals_are_the_training_images_before_the_attack():
    """The official code's WaNet data (PBEConfig.clean_originals): every training image as it was before the attack,
    in the training set's order: the poisoned ones and the noise-mode ones without their warps, the rest as they are."""
    backdoor = train_backdoor("wanet", epochs=1)
    data = backdoor.data
    originals = clean_originals(LocalContext(), backdoor)
    changed = (originals != data.x_train).flatten(1).any(1)
    flags = data.poison_flags
    assert flags.any() and changed[flags].all(), "every warped (poisoned) image is given back unwarped"
    noise_mode = int(backdoor.metrics["wanet_noise_count"])
    assert noise_mode > 0 and int(changed[~flags].sum()) == noise_mode, "and so is every noise-mode image"
    ctx, result = run_pbe(backdoor, clean_originals=True, **TINY)
    # and PBE runs end to end on them
    assert ctx.reports and all(torch.isfinite(v).all() for v in result.model_state.values() if v.is_floating_point())
