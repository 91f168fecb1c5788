"""Fine-tuning: Cutout, the stepped lr schedule shared with NAD/ARGD, resumption and bad configs. Its numbers on
digits are measured beside ARGD's in test_argd.py."""
from __future__ import annotations

import pytest
import torch

from methods.core.schedules import scaled_steps, stepped_lr
from methods.defenses.attention import cutout
from methods.defenses.common import clean_subset
from methods.defenses.configs import FTConfig


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
