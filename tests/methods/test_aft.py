"""AFT: removes BadNets and Blend backdoors on digits with its preset's clean data (10%); its pieces; resume; bad
configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import methods.defenses.aft as aft
from methods.core.context import LocalContext
from methods.core.method import get_method
from methods.core.training import make_generator
from methods.data.embedded import DIGITS_INFO
from methods.models.base import build_model
from tests.conftest import assert_defended

PRESET = yaml.safe_load((Path(__file__).resolve().parents[2] / "search_spaces/presets/digits/aft.yaml").read_text())


def run_aft(backdoor, stop_after_step=None, checkpoint=None, **overrides):
    spec = get_method("aft")
    ctx = LocalContext(backdoor_provider=lambda: backdoor, stop_after_step=stop_after_step, checkpoint=checkpoint)
    result = spec.run(ctx, spec.make_config({**PRESET, **overrides}))
    return ctx, result


@pytest.mark.slow
def test_aft_with_its_digits_preset_removes_the_backdoor(digits_backdoor):
    before = digits_backdoor.metrics
    ctx, result = run_aft(digits_backdoor)
    after = result.metrics
    print(
        f"\naft {digits_backdoor.attack}: test ACC {before['test_acc']:.3f} -> {after['test_acc']:.3f}, "
        f"ASR {before['test_asr']:.3f} -> {after['test_asr']:.3f} (val ACC {after['val_acc']:.3f}, "
        f"ASR {after['val_asr']:.3f}, DER {after['val_der']:.3f})"
    )
    assert before["test_asr"] >= 0.9
    assert_defended(f"aft on {digits_backdoor.attack}", after, before)
    assert [s for s, _ in ctx.reports] == list(range(1, PRESET["epochs"] + 1))
    adversarial = [m["adversarial"] for _, m in ctx.reports]
    assert adversarial == [1.0] * PRESET["adv_epochs"] + [0.0] * (PRESET["epochs"] - PRESET["adv_epochs"])
    assert all({"val_acc", "val_asr", "val_der", "test_asr", "train_loss"} <= set(m) for _, m in ctx.reports)


def toy_batch():
    torch.manual_seed(0)
    model = build_model("small_cnn", DIGITS_INFO)
    return model, torch.rand(8, 1, 16, 16), torch.randint(0, 10, (8,))


def test_adversarial_batch_follows_the_config():
    model, x, y = toy_batch()
    cfg = aft.AFTConfig(adv_eps=8 / 255, adv_steps=3)
    assert cfg.step_size() == pytest.approx(8 / 255 / 5), "the code's step: eps / 5"
    adv = aft.adversarial_batch(model, x, y, cfg, torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= 8 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    again = aft.adversarial_batch(model, x, y, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(adv, again)
    official = aft.AFTConfig(adv_eps=8 / 255, adv_steps=3, adv_random_start=False, adv_clamp=False)
    fixed = aft.adversarial_batch(model, x, y, official)
    assert torch.equal(fixed, aft.adversarial_batch(model, x, y, official)), "no random start: deterministic"
    assert not torch.equal(fixed, adv)
    wide = aft.adversarial_batch(
        model, x, y, aft.AFTConfig(adv_eps=0.2, adv_step_size=0.1, adv_steps=3), torch.Generator().manual_seed(0)
    )
    assert (wide - x).abs().max() > 8 / 255, "adv_step_size and adv_eps are used"


@pytest.mark.parametrize("adv_batches, expected", [(None, 3), (0, 0), (2, 2), (31, 3)])
def test_only_the_leading_batches_of_an_epoch_are_adversarial(monkeypatch, adv_batches, expected):
    model, _, _ = toy_batch()
    x = torch.randint(0, 256, (40, 1, 16, 16), dtype=torch.uint8)
    y = torch.randint(0, 10, (40,))
    calls = []
    real = aft.adversarial_batch
    monkeypatch.setattr(aft, "adversarial_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = aft.AFTConfig(batch_size=16, adv_steps=1, lr=0.01)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    loss = aft.adversarial_finetune_epoch(
        model, optimizer, x, y, cfg, DIGITS_INFO, make_generator(0, x.device), make_generator(1, x.device), adv_batches
    )
    assert len(calls) == expected
    assert torch.isfinite(loss) and loss.dim() == 0
    assert model.training
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters())), "the model was trained"


@pytest.mark.parametrize(
    "values, field",
    [
        ({"clean_ratio": 0.0}, "clean_ratio"),
        ({"clean_ratio": 1.5}, "clean_ratio"),
        ({"epochs": 3, "adv_epochs": 4}, "adv_epochs"),
        ({"adv_epochs": -1}, "adv_epochs"),
        ({"adv_eps": 2.0}, "adv_eps"),
        ({"adv_steps": 0}, "adv_steps"),
        ({"adv_step_size": -0.1}, "adv_step_size"),
        ({"lr": -1.0}, "lr"),
        ({"adv_random_start": "yes"}, "adv_random_start"),
    ],
)
def test_bad_config_values_name_the_field(values, field):
    with pytest.raises(ValueError, match=field):
        aft.AFTConfig.from_dict(values)
