"""SD (D-BR/D-ST's sample distinguishment): the centroid loss, the FCT score, the rank split, the poisoned pool's
precision on real digits backdoors, resume, and config checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml

from methods.core.context import LocalContext
from methods.core.method import get_method
from methods.core.metrics import POOL_CLEAN, POOL_POISON, POOL_UNCERTAIN
from methods.data.embedded import DIGITS_INFO
from methods.defenses.configs.sd import FCT_RESAMPLES, FCT_TRANSFORMS
from methods.defenses.sd import (
    SDConfig,
    centroid_separation_loss,
    fct_scores,
    fct_transform,
    sd_steps,
    split_by_rank,
    split_by_thresholds,
)

PRESET = yaml.safe_load((Path(__file__).resolve().parents[2] / "search_spaces/presets/digits/sd.yaml").read_text())


# ------------------------------------------------------------------------------------------- loss and score units
def test_centroid_loss_is_the_mean_off_diagonal_cosine_of_the_present_classes():
    # classes 0 and 2 present (of 5); centroids (1, 0) and (1, 1)/sqrt(2): cosine 1/sqrt(2), counted twice over 2x2
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    labels = torch.tensor([0, 0, 2, 2])
    expected = 2 * (1 / np.sqrt(2)) / 4
    assert centroid_separation_loss(features, labels, 5).item() == pytest.approx(expected, rel=1e-5)
    orthogonal = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    assert centroid_separation_loss(orthogonal, torch.tensor([0, 1]), 2).item() == pytest.approx(0.0, abs=1e-7)
    one_class = torch.randn(4, 3)
    assert centroid_separation_loss(one_class, torch.zeros(4, dtype=torch.long), 3).item() == pytest.approx(0.0)


def test_centroid_loss_gradient_pushes_centroids_apart():
    features = torch.tensor([[1.0, 0.2], [0.9, 0.1], [1.0, 0.3], [0.8, 0.4]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    before = centroid_separation_loss(features, labels, 2)
    before.backward()
    moved = (features - 0.5 * features.grad).detach()
    assert centroid_separation_loss(moved, labels, 2).item() < before.item()


class _ConstantFeatures(nn.Module):
    def features(self, x):
        return torch.ones(len(x), 4)


class _PixelFeatures(nn.Module):
    def features(self, x):
        return x.flatten(1)


def test_fct_of_a_feature_constant_model_is_zero():
    x = torch.randint(0, 256, (7, 1, 16, 16), dtype=torch.uint8)
    transform = fct_transform(SDConfig(), DIGITS_INFO)
    scores = fct_scores(_ConstantFeatures(), x, transform, torch.Generator().manual_seed(0))
    assert scores.shape == (7,) and torch.all(scores == 0)


@pytest.mark.parametrize("resample", FCT_RESAMPLES)
@pytest.mark.parametrize("name", FCT_TRANSFORMS)
def test_fct_scores_are_per_sample_non_negative_and_see_change(name, resample):
    cfg = SDConfig(fct_transform=name, fct_resample=resample, fct_n_draws=3)
    x = torch.zeros(6, 1, 16, 16, dtype=torch.uint8)
    x[1:, :, 2:9, 3:7] = 255  # an off-centre bar that every transform moves, blurs, flips or may erase
    transform = fct_transform(cfg, DIGITS_INFO)
    scores = fct_scores(_PixelFeatures(), x, transform, torch.Generator().manual_seed(0), cfg.fct_n_draws, batch_size=4)
    assert scores.shape == (6,) and torch.all(scores >= 0)
    assert scores[0] == 0  # a blank image is unchanged by every transform
    assert scores[1:].max() > 0
    again = fct_scores(_PixelFeatures(), x, transform, torch.Generator().manual_seed(0), cfg.fct_n_draws, batch_size=4)
    assert torch.equal(scores, again)


def test_rank_split_sizes_follow_alpha_c_and_alpha_p():
    scores = torch.rand(101, generator=torch.Generator().manual_seed(1))
    pools = split_by_rank(scores, alpha_c=0.2, alpha_p=0.05)
    assert int((pools == POOL_CLEAN).sum()) == 20 and int((pools == POOL_POISON).sum()) == 5
    assert int((pools == POOL_UNCERTAIN).sum()) == 76
    order = torch.argsort(scores)
    assert torch.all(pools[order[:20]] == POOL_CLEAN) and torch.all(pools[order[-5:]] == POOL_POISON)
    assert int((split_by_rank(scores, 0.0, 0.0) == POOL_UNCERTAIN).sum()) == 101


def test_threshold_split_applies_the_reference_thresholds_to_new_scores():
    reference = torch.arange(100, dtype=torch.float32)
    pools = split_by_thresholds(reference, reference.flip(0), alpha_c=0.2, alpha_p=0.05)
    assert int((pools == POOL_CLEAN).sum()) == 21  # scores <= gamma_c = reference rank 20
    assert int((pools == POOL_POISON).sum()) == 5 and torch.all(pools[:5] == POOL_POISON)


# ------------------------------------------------------------------------------------------------ config checks
@pytest.mark.parametrize(
    "values, message",
    [
        ({"alpha_c": 0.8, "alpha_p": 0.3}, "alpha_c \\+ alpha_p"),
        ({"alpha_p": -0.1}, "alpha_p"),
        ({"fct_model": "teacher"}, "fct_model"),
        ({"fct_transform": "jpeg"}, "fct_transform"),
        ({"fct_resample": "bicubic"}, "fct_resample"),
        ({"fct_n_draws": 0}, "fct_n_draws"),
        ({"fct_blur_kernel": 4}, "fct_blur_kernel"),
        ({"sd_ft_epochs": -1}, "sd_ft_epochs"),
    ],
)
def test_bad_sd_config_names_the_field(values, message):
    with pytest.raises(ValueError, match=message):
        SDConfig.from_dict(values)


# ------------------------------------------------------------------------------------------------ real training
def _run(backdoor, **values):
    spec = get_method("sd")
    ctx = LocalContext(backdoor_provider=lambda: backdoor)
    return ctx, spec.run(ctx, spec.make_config(values))


@pytest.mark.slow
def test_sd_poisoned_pool_is_precise_on_digits(digits_backdoor):
    ctx, result = _run(digits_backdoor, **PRESET)
    cfg = SDConfig.from_dict(PRESET)
    steps = [s for s, _ in ctx.reports]
    assert steps == list(range(1, sd_steps(cfg) + 1))
    m = ctx.reports[-1][1]
    print(
        f"\nSD {digits_backdoor.attack}: poison pool precision {m['split_poison_precision']:.3f} recall "
        f"{m['split_poison_recall']:.3f}, clean pool precision {m['split_clean_precision']:.3f}, "
        f"auroc {m['split_auroc']:.3f}, val_fct_auroc {m['val_fct_auroc']:.3f}"
    )
    assert m["split_poison_precision"] >= 0.8
    assert m["split_clean_precision"] >= 0.95
    table = ctx.hand_offs["scores"]
    n = len(digits_backdoor.data.y_train)
    assert len(table["score"]) == n and np.all(table["score"] >= 0)
    assert (table["pool"] == "poison").sum() == int(cfg.alpha_p * n) == m["pool_poison_size"]
    assert (table["pool"] == "clean").sum() == int(cfg.alpha_c * n) == m["pool_clean_size"]
    assert result.metrics["split_poison_precision"] == m["split_poison_precision"]
