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


def _torchvision_rotate_then_translate(img: torch.Tensor, angle: float, tx: int, ty: int) -> torch.Tensor:
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    rotated = TF.rotate(img, angle, interpolation=InterpolationMode.NEAREST, fill=0)
    return TF.affine(
        rotated,
        angle=0.0,
        translate=[tx, ty],
        scale=1.0,
        shear=[0.0, 0.0],
        interpolation=InterpolationMode.NEAREST,
        fill=0,
    )


def test_fct_rotate_translate_matches_torchvision_pixel_for_pixel():
    from methods.data.augment import rotate_nearest, translate_nearest

    # 30 / 60 / 120 / 150 degrees land output pixels on exact half-pixel ties at odd sizes (9, 15).
    angles = torch.tensor([90.0, 37.5, -120.0, 180.0, -180.0, 30.0, 60.0, 150.0, -45.0, 0.0])
    shifts = torch.tensor(
        [[0, 0], [2, -1], [-3, 3], [1, 0], [0, -2], [-1, -1], [3, 2], [0, 1], [-2, 0], [1, 1]], dtype=torch.float32
    )
    g = torch.Generator().manual_seed(0)
    for size in (8, 9, 15):
        x = torch.randint(0, 256, (len(angles), 3, size, size), generator=g).float()
        out = translate_nearest(rotate_nearest(x, angles), shifts)
        for i in range(len(angles)):
            expected = _torchvision_rotate_then_translate(
                x[i : i + 1], angles[i].item(), int(shifts[i, 0]), int(shifts[i, 1])
            )
            assert torch.equal(out[i : i + 1], expected), (size, angles[i].item(), shifts[i].tolist())


def test_fct_rotate_translate_draws_angles_and_whole_pixel_shifts_like_torchvision():
    from methods.data.augment import draw_rotate_translate, random_rotate_translate, rotate_nearest, translate_nearest

    for size in (16, 28):
        angle, shift = draw_rotate_translate(
            4096, size, size, 180.0, 0.2, torch.Generator().manual_seed(1), torch.device("cpu")
        )
        assert angle.abs().max() <= 180.0 and angle.min() < -170 and angle.max() > 170
        assert torch.equal(shift, shift.round())
        limit = round(0.2 * size)
        assert shift.abs().max() == limit and set(shift.unique().tolist()) == set(range(-limit, limit + 1))
    # The random transformation is exactly the warp of the drawn parameters.
    x = torch.rand(6, 1, 16, 16)
    angle, shift = draw_rotate_translate(6, 16, 16, 180.0, 0.2, torch.Generator().manual_seed(2), x.device)
    drawn = random_rotate_translate(x, 180.0, 0.2, torch.Generator().manual_seed(2))
    assert torch.equal(drawn, translate_nearest(rotate_nearest(x, angle), shift))
