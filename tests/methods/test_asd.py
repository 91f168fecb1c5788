"""ASD: MixMatch pieces on toy tensors, the split rules, config checks, resume, and the defense on real training
(BadNets and Blend all2one 10% on digits, the preset's shortened schedule)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from methods.core.context import LocalContext
from methods.core.method import get_method
from methods.defenses import asd
from methods.defenses.asd import ASDConfig
from methods.defenses.shared.mixmatch import (
    interleave,
    mixup,
    mixup_lambdas,
    ramp_weight,
    sample_beta,
    sharpen,
    soft_cross_entropy,
    squared_error,
    uninterleave,
)
from tests.conftest import assert_defended

PRESET = yaml.safe_load((Path(__file__).resolve().parents[2] / "search_spaces/presets/digits/asd.yaml").read_text())


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


# --- MixMatch pieces -------------------------------------------------------------------------------------------


def test_sharpen_normalises_lowers_entropy_and_is_identity_at_t1():
    p = torch.softmax(torch.randn(32, 10, generator=gen()), dim=1)
    sharp = sharpen(p, 0.5)
    assert torch.allclose(sharp.sum(1), torch.ones(32), atol=1e-6)
    assert (entropy(sharp) < entropy(p)).all()
    assert torch.allclose(sharpen(p, 1.0), p, atol=1e-6)
    assert torch.equal(sharp.argmax(1), p.argmax(1))
    assert torch.allclose(sharp, p**2 / (p**2).sum(1, keepdim=True), atol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        sharpen(p, 0.0)


def test_beta_sampler_matches_the_distribution_and_follows_the_generator():
    for a, b in ((0.75, 0.75), (2.0, 5.0), (0.1, 0.1)):
        s = sample_beta(a, b, 20_000, gen(1)).double()
        assert ((s >= 0) & (s <= 1)).all() and not torch.isnan(s).any()
        assert s.mean().item() == pytest.approx(a / (a + b), abs=0.01)
        assert s.var().item() == pytest.approx(a * b / ((a + b) ** 2 * (a + b + 1)), rel=0.05)
    assert torch.equal(sample_beta(0.75, 0.75, 100, gen(3)), sample_beta(0.75, 0.75, 100, gen(3)))
    assert not torch.equal(sample_beta(0.75, 0.75, 100, gen(3)), sample_beta(0.75, 0.75, 100, gen(4)))


def test_mixup_lambda_is_at_least_one_half_and_mixes_within_bounds():
    lam = mixup_lambdas(0.75, 5000, gen())
    assert ((lam >= 0.5) & (lam <= 1.0)).all()
    assert lam.min().item() < 0.55 and lam.max().item() > 0.95  # the whole [0.5, 1] range is used
    x = torch.rand(16, 1, 4, 4, generator=gen(1))
    t = torch.softmax(torch.randn(16, 10, generator=gen(2)), dim=1)
    mixed_x, mixed_t = mixup(x, t, lam[0], gen(5))
    assert mixed_x.shape == x.shape and mixed_t.shape == t.shape
    lo, hi = x.min(0).values, x.max(0).values
    assert ((mixed_x >= lo - 1e-6) & (mixed_x <= hi + 1e-6)).all()
    assert torch.allclose(mixed_t.sum(1), torch.ones(16), atol=1e-6)
    # lam' >= 0.5: each mixed sample stays at least as close to its own input as to its partner
    assert ((mixed_x - x).abs() <= (1 - lam[0]) * (x.max() - x.min()) + 1e-6).all()
    again_x, again_t = mixup(x, t, lam[0], gen(5))
    assert torch.equal(again_x, mixed_x) and torch.equal(again_t, mixed_t)
    assert torch.equal(mixup_lambdas(0.75, 50, gen(9)), mixup_lambdas(0.75, 50, gen(9)))
    assert torch.equal(mixup(x, t, 1.0, gen(5))[0], x)


def test_unlabeled_weight_ramps_linearly():
    assert ramp_weight(15.0, 0.0, 120) == 0.0
    assert ramp_weight(15.0, 30.0, 120) == pytest.approx(3.75)
    assert ramp_weight(15.0, 60.0, 120) == pytest.approx(7.5)
    assert ramp_weight(15.0, 120.0, 120) == pytest.approx(15.0)
    assert ramp_weight(15.0, 500.0, 120) == pytest.approx(15.0)
    assert ramp_weight(15.0, -1.0, 120) == 0.0
    steps = torch.linspace(0, 10, 11)
    assert torch.allclose(ramp_weight(2.0, steps, 10), steps / 5)


@pytest.mark.parametrize("batch,chunks", [(64, 3), (10, 3), (7, 2), (5, 5)])
def test_interleave_round_trips_and_keeps_batch_sizes(batch, chunks):
    parts = [torch.arange(batch) + 1000 * i for i in range(chunks)]
    mixed = interleave(parts)
    assert [len(m) for m in mixed] == [batch] * chunks
    # the first forward chunk holds a share of every chunk, and every chunk holds some labeled (chunk 0) samples
    assert {int(v) // 1000 for v in mixed[0]} == set(range(chunks))
    assert all((m < 1000).any() for m in mixed)
    assert torch.equal(torch.cat(mixed).sort().values, torch.cat(parts).sort().values)
    back = uninterleave(mixed)
    for original, restored in zip(parts, back):
        assert torch.equal(original, restored)
    with pytest.raises(ValueError, match="equal sizes"):
        interleave([torch.zeros(4), torch.zeros(3)])


def test_mixmatch_losses():
    logits = torch.randn(8, 10, generator=gen())
    y = torch.randint(0, 10, (8,), generator=gen(1))
    one_hot = F.one_hot(y, 10).float()
    assert soft_cross_entropy(logits, one_hot).item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert squared_error(logits, torch.softmax(logits, 1)).item() == pytest.approx(0.0, abs=1e-12)
    expected = ((torch.softmax(logits, 1) - one_hot) ** 2).sum() / 80
    assert squared_error(logits, one_hot).item() == pytest.approx(expected.item(), rel=1e-6)


# --- split rules ---------------------------------------------------------------------------------------------


def test_symmetric_cross_entropy():
    logits = torch.randn(16, 10, generator=gen())
    y = torch.randint(0, 10, (16,), generator=gen(1))
    p_y = torch.softmax(logits, 1).gather(1, y[:, None]).squeeze(1)
    rce = asd.sce_loss(logits, y, 0.0, 1.0)
    assert torch.allclose(rce, -math.log(1e-4) * (1 - p_y), rtol=1e-3, atol=1e-4)
    ce = F.cross_entropy(logits, y, reduction="none")
    assert torch.allclose(asd.sce_loss(logits, y, 0.1, 1.0), 0.1 * ce + rce, atol=1e-5)


def test_stage_boundaries_scale_with_epochs():
    cfg = ASDConfig()
    stages = [asd.stage_of(e, cfg) for e in range(cfg.epochs)]
    assert stages.count(1) == 60 and stages.count(2) == 30 and stages.count(3) == 30
    assert stages == sorted(stages)
    short = ASDConfig(epochs=12)
    assert [asd.stage_of(e, short) for e in range(12)] == [1] * 6 + [2] * 3 + [3] * 3


def test_class_aware_pool_keeps_seeds_and_takes_lowest_loss_per_class():
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    loss = torch.tensor([5.0, 0.1, 0.2, 0.3, 0.9, 0.8, 0.7, 0.6])
    seeds = torch.tensor([0, 4])
    assert asd.class_aware_pool(loss, y, seeds, 0, 2).nonzero().flatten().tolist() == [0, 4]
    assert asd.class_aware_pool(loss, y, seeds, 2, 2).nonzero().flatten().tolist() == [0, 1, 2, 4, 6, 7]
    assert asd.class_aware_pool(loss, y, seeds, 50, 2).all()
    pool = asd.lowest_fraction_pool(torch.tensor([3.0, 1.0, 2.0, 0.0]), 0.5)
    assert pool.tolist() == [False, True, False, True]


def test_clean_seeds_are_clean_balanced_and_follow_the_clean_seed(badnets_backdoor):
    data = badnets_backdoor.data
    a = asd.clean_seed_indices(badnets_backdoor, 10, 123)
    assert not data.poison_flags[a].any()
    assert torch.bincount(data.y_train[a], minlength=10).tolist() == [10] * 10
    assert torch.equal(a, asd.clean_seed_indices(badnets_backdoor, 10, 123))
    assert not torch.equal(a, asd.clean_seed_indices(badnets_backdoor, 10, 124))


# --- config ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values,field",
    [
        ({"stage1_end": 0.8, "stage2_end": 0.6}, "stage2_end"),
        ({"epsilon": 1.5}, "epsilon"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"seed_num": 0}, "seed_num"),
        ({"class_period": 0}, "class_period"),
        ({"temperature": 0.0}, "temperature"),
        ({"mixup_alpha": -1.0}, "mixup_alpha"),
        ({"meta_layers": "all"}, "meta_layers"),
        ({"sce_alpha": 0.0, "sce_beta": 0.0}, "sce_alpha"),
        ({"lr": 0.0}, "lr"),
        ({"iterations_per_epoch": 0}, "iterations_per_epoch"),
        ({"record_with_aug": "yes"}, "record_with_aug"),
    ],
)
def test_bad_config_values_raise_naming_the_field(values, field):
    with pytest.raises(ValueError, match=field):
        ASDConfig.from_dict(values)


def test_preset_is_a_valid_config():
    cfg = ASDConfig.from_dict(PRESET)
    assert cfg.epochs < ASDConfig().epochs


# --- runs ------------------------------------------------------------------------------------------------------

TINY = dict(
    epochs=4,
    iterations_per_epoch=2,
    batch_size=16,
    stage1_end=0.25,
    stage2_end=0.5,
    eval_batch_size=512,
    class_increment=5,
    class_period=1,
)


def test_a_run_goes_through_the_three_stages_and_hands_over_its_last_split(badnets_backdoor):
    ctx = LocalContext(backdoor_provider=lambda: badnets_backdoor)
    get_method("asd").run(ctx, get_method("asd").make_config(TINY))
    assert [s for s, _ in ctx.reports] == [1, 2, 3, 4]
    assert [m["asd_stage"] for _, m in ctx.reports] == [1, 2, 3, 3]
    assert ctx.series["asd_pools"]["epoch"] == [1, 2, 3, 4]
    pools = ctx.hand_offs["scores"]["pool"]
    assert set(pools) == {"clean", "poison"}
    assert (pools == "clean").sum() == int(0.5 * len(pools))


@pytest.mark.slow
def test_asd_trained_from_scratch_removes_the_backdoor(digits_backdoor, clean_reference):
    spec = get_method("asd")
    cfg = spec.make_config(PRESET)
    ctx = LocalContext(backdoor_provider=lambda: digits_backdoor)
    started = time.perf_counter()
    result = spec.run(ctx, cfg)
    seconds = time.perf_counter() - started
    before, after, clean = digits_backdoor.metrics, result.metrics, clean_reference.metrics
    last_step, last = ctx.reports[-1]
    pools = ctx.series["asd_pools"]
    print(
        f"\nasd {digits_backdoor.attack}: backdoored test ACC/ASR {before['test_acc']:.3f}/{before['test_asr']:.3f}"
        f" -> defended {after['test_acc']:.3f}/{after['test_asr']:.3f} (clean training ACC {clean['test_acc']:.3f});"
        f" val ACC/ASR {after['val_acc']:.3f}/{after['val_asr']:.3f}; final clean pool {int(last['pool_clean_size'])}"
        f" with {pools['clean_pool_poisoned'][-1]} poisoned (frac {last['pool_clean_poisoned_frac']:.4f}),"
        f" split AUROC {last['split_auroc']:.3f}, poison recall {last['split_poison_recall']:.3f}; {seconds:.0f}s"
    )
    assert last_step == cfg.epochs
    assert sorted(set(pools["stage"])) == [1, 2, 3]
    for key in (
        "split_poison_precision",
        "split_poison_recall",
        "split_clean_precision",
        "split_clean_recall",
        "split_auroc",
        "pool_clean_size",
        "pool_poison_size",
        "pool_clean_poisoned_frac",
        "val_der",
    ):
        assert all(key in m for _, m in ctx.reports), key
    assert_defended(f"asd on {digits_backdoor.attack}", after, clean)
    assert last["pool_clean_poisoned_frac"] < 0.01
    scores = ctx.hand_offs["scores"]
    assert len(scores["score"]) == len(digits_backdoor.data.y_train)
