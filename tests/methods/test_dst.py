"""D-ST: the SupCon positive mask and loss, the guarded mixed CE, the warm-up/cosine schedule, secure training
from scratch on poisoned digits, resume, and config checks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from methods.core.context import LocalContext
from methods.core.method import get_method
from methods.defenses.dst import DSTConfig, mixed_cross_entropy, supcon_loss, supcon_lr, supcon_positive_mask
from methods.defenses.sd import sd_steps
from tests.conftest import assert_defended

PRESET = yaml.safe_load((Path(__file__).resolve().parents[2] / "search_spaces/presets/digits/dst.yaml").read_text())


# ------------------------------------------------------------------------------------------------ loss pieces
def test_positive_mask_gives_same_label_positives_to_clean_anchors_only():
    labels = torch.tensor([0, 0, 1, 0])
    clean = torch.tensor([True, False, False, True])
    mask = supcon_positive_mask(labels, clean)  # views: 0..3 first view, 4..7 second view
    expected = torch.zeros(8, 8, dtype=torch.bool)
    for anchor in (0, 3, 4, 7):  # clean anchors: every other label-0 view, from any pool
        expected[anchor, [i for i in (0, 1, 3, 4, 5, 7) if i != anchor]] = True
    for anchor in (1, 2):  # other anchors: only their own second view
        expected[anchor, anchor + 4] = True
        expected[anchor + 4, anchor] = True
    assert torch.equal(mask, expected)
    assert not mask.diagonal().any()
    # clean_positives_only: clean anchors keep only clean same-label views (sample 3, and their own twin)
    strict = supcon_positive_mask(labels, clean, clean_positives_only=True)
    expected[[0, 4, 3, 7]] = False
    for anchor, positives in ((0, (3, 4, 7)), (4, (0, 3, 7)), (3, (0, 4, 7)), (7, (0, 3, 4))):
        expected[anchor, list(positives)] = True
    assert torch.equal(strict, expected)


def _supcon_by_hand(z1, z2, labels, clean, t, t_base):
    z = torch.cat([z1, z2])
    mask = supcon_positive_mask(labels, clean)
    losses = []
    for i in range(len(z)):
        others = [a for a in range(len(z)) if a != i]
        denominator = sum(math.exp(float(z[i] @ z[a]) / t) for a in others)
        positives = [p for p in range(len(z)) if mask[i, p]]
        mean_log = sum(float(z[i] @ z[p]) / t - math.log(denominator) for p in positives) / len(positives)
        losses.append(-(t / t_base) * mean_log)
    return sum(losses) / len(losses)


def test_supcon_loss_matches_its_definition_on_toy_tensors():
    g = torch.Generator().manual_seed(0)
    z1 = F.normalize(torch.randn(5, 4, generator=g), dim=1)
    z2 = F.normalize(torch.randn(5, 4, generator=g), dim=1)
    labels = torch.tensor([0, 1, 0, 2, 1])
    clean = torch.tensor([True, True, False, False, True])
    got = supcon_loss(z1, z2, labels, clean, temperature=0.1, base_temperature=0.07).item()
    assert got == pytest.approx(_supcon_by_hand(z1, z2, labels, clean, 0.1, 0.07), rel=1e-4)


def test_supcon_loss_is_lower_when_twins_agree():
    g = torch.Generator().manual_seed(1)
    z1 = F.normalize(torch.randn(8, 16, generator=g), dim=1)
    labels, clean = torch.arange(8), torch.zeros(8, dtype=torch.bool)
    aligned = supcon_loss(z1, z1.clone(), labels, clean, 0.1, 0.07)
    unrelated = supcon_loss(z1, F.normalize(torch.randn(8, 16, generator=g), dim=1), labels, clean, 0.1, 0.07)
    assert aligned.item() < unrelated.item()


def test_mixed_ce_subtracts_the_poisoned_ce_and_survives_batches_without_poisoned_samples():
    logits, labels = torch.randn(6, 4, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2, 3, 0, 1])
    poisoned = torch.tensor([False, False, True, False, True, False])
    ce = F.cross_entropy(logits, labels, reduction="none")
    expected = ce[~poisoned].mean() - 0.5 * ce[poisoned].mean()
    assert mixed_cross_entropy(logits, labels, poisoned, 0.5).item() == pytest.approx(expected.item(), rel=1e-6)
    none = torch.zeros(6, dtype=torch.bool)
    guarded = mixed_cross_entropy(logits, labels, none, 0.5)
    assert torch.isfinite(guarded) and guarded.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    all_poisoned = mixed_cross_entropy(logits, labels, ~none, 0.5)
    assert all_poisoned.item() == pytest.approx(-0.5 * F.cross_entropy(logits, labels).item(), rel=1e-6)


def test_supcon_schedule_warms_up_then_follows_the_cosine():
    cfg = DSTConfig(st_epochs=100, st_lr=0.5, st_warmup_epochs=10, st_warmup_from=0.01)
    assert supcon_lr(cfg, 1, 0, 4) == pytest.approx(0.01)
    warm_end = supcon_lr(cfg, 11, 0, 4)
    assert supcon_lr(cfg, 10, 3, 4) < warm_end
    assert supcon_lr(cfg, 5, 0, 4) < supcon_lr(cfg, 5, 1, 4) < supcon_lr(cfg, 6, 0, 4)
    assert supcon_lr(cfg, 100, 0, 4) == pytest.approx(0.5 * 1e-3)
    first_cosine_epoch = 0.5e-3 + (0.5 - 0.5e-3) * (1 + math.cos(math.pi / 100)) / 2
    assert supcon_lr(DSTConfig(st_epochs=100, st_warmup_epochs=0), 1, 0, 4) == pytest.approx(first_cosine_epoch)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"alpha_c": 0.7, "alpha_p": 0.5}, "alpha_c \\+ alpha_p"),
        ({"st_supcon_temperature": 0.0}, "st_supcon_temperature"),
        ({"st_lambda_p": -0.1}, "st_lambda_p"),
        ({"st_epochs": 0}, "st_epochs"),
        ({"st_batch_size": 1}, "st_batch_size"),
        ({"st_cls_lr": "fast"}, "st_cls_lr"),
    ],
)
def test_bad_dst_config_names_the_field(values, message):
    with pytest.raises(ValueError, match=message):
        DSTConfig.from_dict(values)


# ------------------------------------------------------------------------------------------------ real training
@pytest.mark.slow
def test_dst_trains_a_clean_model_from_the_poisoned_set(digits_backdoor, clean_reference):
    spec = get_method("dst")
    cfg = spec.make_config(PRESET)
    ctx = LocalContext(backdoor_provider=lambda: digits_backdoor)
    result = spec.run(ctx, cfg)
    assert [s for s, _ in ctx.reports] == list(range(1, sd_steps(cfg) + cfg.st_epochs + cfg.st_cls_epochs + 1))
    after, clean = result.metrics, clean_reference.metrics
    print(
        f"\nD-ST {digits_backdoor.attack}: poisoned training {digits_backdoor.metrics['test_acc']:.3f} / "
        f"{digits_backdoor.metrics['test_asr']:.3f}, clean training {clean['test_acc']:.3f}, D-ST ACC "
        f"{after['test_acc']:.3f} ASR {after['test_asr']:.3f}, poison pool precision "
        f"{after['split_poison_precision']:.3f}"
    )
    assert_defended(f"dst on {digits_backdoor.attack}", after, clean)
