from __future__ import annotations

import torch

from methods.data.augment import horizontal_flip, random_crop, standard_augment, strong_augment
from methods.data.embedded import DIGITS_INFO, SYNTHETIC_INFO


def test_crop_keeps_shape_and_moves_content_within_padding():
    x = torch.zeros(8, 1, 16, 16)
    x[:, :, 8, 8] = 1.0
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    pos = torch.nonzero(out[:, 0] == 1.0)
    assert ((pos[:, 1:] - 8).abs() <= 2).all() and len(pos) == 8


def test_flip_and_determinism():
    x = torch.rand(16, 3, 8, 8)
    out = horizontal_flip(x, torch.Generator().manual_seed(0), p=1.0)
    assert torch.equal(out, x.flip(-1))
    a = standard_augment(x, SYNTHETIC_INFO, torch.Generator().manual_seed(3))
    b = standard_augment(x, SYNTHETIC_INFO, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_strong_views_stay_in_range_for_both_kinds_of_dataset():
    for info in (DIGITS_INFO, SYNTHETIC_INFO):
        x = torch.rand(8, info.channels, info.size, info.size)
        v = strong_augment(x, info, torch.Generator().manual_seed(0))
        assert v.shape == x.shape and v.min() >= 0 and v.max() <= 1 and not torch.equal(v, x)


def test_backdoor_pipeline_rotation_switches_off_without_changing_crop_and_flip():
    from methods.data.augment import backdoor_pipeline_augment, random_crop

    x = torch.rand(64, 3, 32, 32)
    off = backdoor_pipeline_augment(x, SYNTHETIC_INFO, torch.Generator().manual_seed(5), rotation_deg=0.0)
    # With rotation off the pipeline is exactly crop (p 0.8) then flip, drawing the same random numbers.
    g = torch.Generator().manual_seed(5)
    expected = horizontal_flip(random_crop(x, 5, g, p=0.8), g)
    assert torch.equal(off, expected)
    on = backdoor_pipeline_augment(x, SYNTHETIC_INFO, torch.Generator().manual_seed(5))
    assert not torch.equal(on, off)  # the default (10 degrees) still rotates some images
