"""D-BR: removes BadNets/Blend backdoors on digits, keeps the round chosen on validation, resumes, checks config."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from methods.core.context import LocalContext, StopRun
from methods.core.method import get_method
from methods.defenses.dbr import DBRConfig, _ascent
from methods.defenses.sd import sd_steps

PRESET = yaml.safe_load((Path(__file__).resolve().parents[2] / "search_spaces/presets/digits/dbr.yaml").read_text())


def test_unlearning_loss_is_negative_cross_entropy():
    logits, labels = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    assert _ascent(logits, labels).item() == pytest.approx(-torch.nn.functional.cross_entropy(logits, labels).item())


@pytest.mark.parametrize("values, message", [
    ({"alpha_c": 0.9, "alpha_p": 0.2}, "alpha_c \\+ alpha_p"),
    ({"br_lr": -1e-4}, "br_lr"),
    ({"br_rounds": 0}, "br_rounds"),
    ({"br_relearn_epochs": 0}, "br_relearn_epochs"),
    ({"br_select": "test"}, "br_select"),
    ({"br_unlearn_lr_scale": -1.0}, "br_unlearn_lr_scale"),
])
def test_bad_dbr_config_names_the_field(values, message):
    with pytest.raises(ValueError, match=message):
        DBRConfig.from_dict(values)


@pytest.mark.slow
def test_dbr_removes_the_backdoor_on_digits(digits_backdoor):
    spec = get_method("dbr")
    cfg = spec.make_config(PRESET)
    ctx = LocalContext(backdoor_provider=lambda: digits_backdoor)
    result = spec.run(ctx, cfg)
    before, after = digits_backdoor.metrics, result.metrics
    first = sd_steps(cfg)
    assert [s for s, _ in ctx.reports] == list(range(1, first + cfg.br_rounds + 1))
    rounds = [m for s, m in ctx.reports if s > first]
    assert all("split_poison_precision" in m for m in rounds)
    # the kept round is the best on validation (never on test), and the final metrics are that round's
    best = max(range(len(rounds)), key=lambda i: rounds[i]["val_acc"] - rounds[i]["val_asr"])
    assert after["br_kept_round"] == best + 1
    assert after["test_asr"] == rounds[best]["test_asr"] and after["test_acc"] == rounds[best]["test_acc"]
    print(f"\nD-BR {digits_backdoor.attack}: ACC {before['test_acc']:.3f} -> {after['test_acc']:.3f}, "
          f"ASR {before['test_asr']:.3f} -> {after['test_asr']:.3f} (round {int(after['br_kept_round'])}), "
          f"poison pool precision {after['split_poison_precision']:.3f}, clean pool precision "
          f"{after['split_clean_precision']:.3f}")
    assert before["test_asr"] >= 0.9
    assert after["test_asr"] <= 0.10
    assert after["test_acc"] >= before["test_acc"] - 0.03


def test_dbr_resumes_inside_the_removal_rounds(badnets_backdoor):
    spec = get_method("dbr")
    cfg = spec.make_config(dict(PRESET, sd_ft_epochs=1, br_rounds=3))
    first = sd_steps(cfg)
    straight_ctx = LocalContext(backdoor_provider=lambda: badnets_backdoor)
    straight = spec.run(straight_ctx, cfg)
    interrupted = LocalContext(backdoor_provider=lambda: badnets_backdoor, stop_after_step=first + 1)
    with pytest.raises(StopRun):
        spec.run(interrupted, cfg)
    resumed_ctx = LocalContext(backdoor_provider=lambda: badnets_backdoor, checkpoint=interrupted.checkpoint)
    resumed = spec.run(resumed_ctx, cfg)
    assert [s for s, _ in resumed_ctx.reports] == [first + 2, first + 3]
    assert "scores" in resumed_ctx.hand_offs
    assert resumed.metrics == straight.metrics
    for key, value in straight.model_state.items():
        assert torch.equal(value, resumed.model_state[key]), key
