"""Fine-tuning: Cutout, the stepped lr schedule shared with NAD/ARGD, resumption and bad configs. Its numbers on
digits are measured beside ARGD's in test_argd.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from methods.core.schedules import scaled_steps, stepped_lr
from methods.defenses.configs.ft import FTConfig
from methods.defenses.shared.attention import cutout
from methods.defenses.shared.common import clean_subset, stratified_quotas


def test_cutout_zeroes_one_floored_square_per_image():
    g = torch.Generator().manual_seed(0)
    x = torch.ones(500, 1, 16, 16)
    out = cutout(x, 3, g)  # half-length 1: a 2 x 2 hole, clipped at the border
    zeros = (out == 0).flatten(1).sum(1)
    assert zeros.max().item() == 4 and zeros.min().item() >= 1
    assert (zeros == 4).float().mean() > 0.7
    big = cutout(x, 8, g)
    assert (big == 0).flatten(1).sum(1).max().item() == 64
    assert torch.equal(cutout(x, 0, g), x) and torch.equal(cutout(x, 1, g), x)


def test_cutout_follows_its_generator():
    x = torch.rand(8, 3, 8, 8)
    a = cutout(x, 4, torch.Generator().manual_seed(3))
    b = cutout(x, 4, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, x)


def test_lr_steps_scale_with_the_schedule_length():
    assert scaled_steps([3, 6], 10, 10) == [3, 6]
    assert scaled_steps([3, 6], 10, 20) == [6, 12]
    assert scaled_steps([2], 20, 10) == [1]
    lrs = [stepped_lr(0.1, [0.1, 0.01], [3, 6], e) for e in range(10)]
    assert lrs == pytest.approx([0.1] * 3 + [0.01] * 3 + [0.001] * 4)


def test_ft_and_the_distillation_defenses_share_the_clean_indices(badnets_backdoor):
    a = clean_subset(badnets_backdoor, 0.1)
    assert torch.equal(a, clean_subset(badnets_backdoor, 0.1))
    assert not badnets_backdoor.data.poison_flags[a.cpu()].any()
    assert len(a) == round(0.1 * len(badnets_backdoor.data.y_train))


def labelled_set(counts: list[int], poisoned: dict[int, int], seed: int = 0) -> SimpleNamespace:
    """A stand-in backdoor with `counts[k]` images of class k, `poisoned[k]` of them poisoned, in shuffled order."""
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    flags = torch.cat([torch.arange(n) < poisoned.get(k, 0) for k, n in enumerate(counts)])
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    data = SimpleNamespace(y_train=labels[order], poison_flags=flags[order], num_classes=len(counts))
    return SimpleNamespace(data=data, seeds={"clean_seed": seed})


@pytest.mark.parametrize("poisoned", [{0: 12}, {8: 110}], ids=["dirty-label-like", "clean-label-90%-of-class"])
@pytest.mark.parametrize("ratio", [0.01, 0.05, 0.1])
@pytest.mark.parametrize("seed", range(5))
def test_every_drawn_clean_set_holds_every_class_in_proportion(poisoned, ratio, seed):
    counts = [124, 127, 125, 128, 121, 127, 126, 125, 122, 133]  # digits' training split
    backdoor = labelled_set(counts, poisoned, seed)
    idx = clean_subset(backdoor, ratio)
    labels = backdoor.data.y_train[idx]
    assert not backdoor.data.poison_flags[idx].any()
    assert len(idx) == round(ratio * sum(counts))
    per_class = torch.bincount(labels, minlength=10)
    assert per_class.min() >= 1, f"a class is missing from the clean set: {per_class.tolist()}"
    clean = torch.tensor([n - poisoned.get(k, 0) for k, n in enumerate(counts)], dtype=torch.float)
    expected = clean / clean.sum() * len(idx)
    assert ((per_class - expected).abs() <= 1).all(), (per_class.tolist(), expected.tolist())


def test_quotas_add_up_and_respect_small_classes():
    assert stratified_quotas([100, 100, 100], 30) == [10, 10, 10]
    assert stratified_quotas([2, 100, 100], 100) == [1, 50, 49]  # 0.99, 49.5, 49.5: ties go to the lower class
    assert sum(stratified_quotas([5, 7, 11, 3], 13)) == 13
    assert stratified_quotas([0, 10, 10], 4) == [0, 2, 2]
    assert stratified_quotas([3, 3], 50) == [3, 3]  # a ratio above what is clean takes all of it
    assert sum(stratified_quotas([10] * 10, 5)) == 5  # fewer than the classes: not every class can be present


@pytest.mark.parametrize(
    "values, field",
    [
        ({"clean_ratio": 1.5}, "clean_ratio"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"cutout_length": -1}, "cutout_length"),
        ({"momentum": 0.0}, "nesterov"),
        ({"lr": "fast"}, "lr"),
    ],
)
def test_bad_config_values_name_the_field(values, field):
    with pytest.raises(ValueError, match=field):
        FTConfig.from_dict(values)
