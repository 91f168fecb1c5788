"""Batched, on-device augmentation of float images in [0, 1] (B, C, H, W).

Every function takes an explicit torch.Generator living on the images' device, so runs are reproducible and a
checkpoint that stores the generator's state resumes bit-identically. Nothing here loops over images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from methods.data.configs import DatasetInfo


def _uniform(
    shape: tuple[int, ...], g: torch.Generator, device: torch.device, lo: float = 0.0, hi: float = 1.0
) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g, device=device)


def random_crop(x: torch.Tensor, pad: int, g: torch.Generator, p: float = 1.0, mode: str = "constant") -> torch.Tensor:
    """Pad by `pad` and cut a random H x W window per image (images not selected with probability p keep the
    centre window, i.e. stay unchanged)."""
    if pad <= 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode=mode)
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=g, device=x.device)
    if p < 1.0:
        keep = _uniform((b,), g, x.device) >= p
        offsets[keep] = pad
    rows = offsets[:, 0, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[:, 1, None] + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def horizontal_flip(x: torch.Tensor, g: torch.Generator, p: float = 0.5) -> torch.Tensor:
    flip = _uniform((x.shape[0],), g, x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def affine(
    x: torch.Tensor, angle_rad: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotate by `angle_rad` (B,) and translate by `shift` (B, 2) in fractions of the image size; zero fill."""
    b = x.shape[0]
    cos, sin = torch.cos(angle_rad), torch.sin(angle_rad)
    s = torch.ones_like(cos) if scale is None else scale
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 1] = cos / s, -sin / s
    theta[:, 1, 0], theta[:, 1, 1] = sin / s, cos / s
    theta[:, :, 2] = 2.0 * shift  # affine_grid works in [-1, 1] coordinates
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_rotation(x: torch.Tensor, degrees: float, g: torch.Generator, p: float = 1.0) -> torch.Tensor:
    if degrees <= 0:
        return x
    b = x.shape[0]
    angle = _uniform((b,), g, x.device, -degrees, degrees) * (math.pi / 180.0)
    angle = torch.where(_uniform((b,), g, x.device) < p, angle, torch.zeros_like(angle))
    return affine(x, angle, torch.zeros(b, 2, device=x.device))


def _torchvision_nearest_warp(x: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Nearest resample of every image through its own inverse affine map `inverse` (B, 2, 3), which takes output
    pixel coordinates centred on the image centre to input ones, with zero fill.

    The grid is built exactly as torchvision's tensor `rotate`/`affine` build it (_gen_affine_grid: pixel-centre
    coordinates, the map, then a division by half the size, all in the images' dtype): F.affine_grid rounds
    differently and picks the other pixel at exact half-pixel ties (odd sizes at 30, 60, 120 degrees...)."""
    b, _, h, w = x.shape
    base = torch.ones(1, h, w, 3, device=x.device, dtype=x.dtype)
    base[..., 0] = torch.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, steps=w, device=x.device, dtype=x.dtype)
    base[..., 1] = torch.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, steps=h, device=x.device, dtype=x.dtype).unsqueeze(-1)
    half_size = torch.tensor([0.5 * w, 0.5 * h], device=x.device, dtype=x.dtype)
    grid = base.view(1, h * w, 3).expand(b, h * w, 3).bmm(inverse.to(x.dtype).transpose(1, 2) / half_size)
    return F.grid_sample(x, grid.view(b, h, w, 2), mode="nearest", padding_mode="zeros", align_corners=False)


def rotate_nearest(x: torch.Tensor, angle_deg: torch.Tensor) -> torch.Tensor:
    """torchvision's `rotate(img, angle, NEAREST, fill=0)` (about the centre, counter-clockwise, same size) with a
    per-image angle (B,) in degrees."""
    # The matrix is computed in float64 and then cast, as torchvision computes it with Python floats.
    rad = angle_deg.to(torch.float64) * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    inverse = torch.zeros(len(rad), 2, 3, device=x.device, dtype=torch.float64)
    inverse[:, 0, 0], inverse[:, 0, 1] = cos, -sin
    inverse[:, 1, 0], inverse[:, 1, 1] = sin, cos
    return _torchvision_nearest_warp(x, inverse)


def translate_nearest(x: torch.Tensor, shift_px: torch.Tensor) -> torch.Tensor:
    """torchvision's `affine(img, angle=0, translate=[tx, ty], scale=1, shear=0, NEAREST, fill=0)` with a per-image
    shift (B, 2) = (tx right, ty down) in pixels."""
    inverse = torch.zeros(len(shift_px), 2, 3, device=x.device, dtype=torch.float64)
    inverse[:, 0, 0] = inverse[:, 1, 1] = 1.0
    inverse[:, :, 2] = -shift_px.to(torch.float64)
    return _torchvision_nearest_warp(x, inverse)


def draw_rotate_translate(
    b: int, h: int, w: int, degrees: float, translate: float, g: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image parameters as torchvision's RandomRotation(degrees) and RandomAffine(0, (translate, translate))
    draw them: an angle uniform in [-degrees, degrees] and whole-pixel shifts round(U(-m, m)) with m = translate x
    the width (tx) or height (ty), so the outermost shifts come up less often than the others."""
    angle = _uniform((b,), g, device, -degrees, degrees)
    max_shift = torch.tensor([translate * w, translate * h], device=device)
    shift = (_uniform((b, 2), g, device, -1.0, 1.0) * max_shift).round()
    return angle, shift


def random_rotate_translate(
    x: torch.Tensor, degrees: float, translate: float, g: torch.Generator, resample: str = "nearest"
) -> torch.Tensor:
    """FCT's transformation. With `resample` "nearest", as the official D-BR/D-ST code draws it:
    RandomRotation(degrees) then RandomAffine(degrees=0, translate=(translate, translate)), both nearest with zero
    fill. The two resamples are kept apart, as there: the shift also moves the zero corners of the rotated frame
    into view, which one composed resample would fill with image content. A range of 0 skips its step (an identity
    there).

    "bilinear" is bdo's earlier transformation, kept as an option because it separates some triggers better on
    tiny images: fractional shifts and one composed bilinear resample, which also smooths the image."""
    b, _, h, w = x.shape
    if resample == "bilinear":
        angle = _uniform((b,), g, x.device, -degrees, degrees) * (math.pi / 180.0)
        shift = _uniform((b, 2), g, x.device, -translate, translate)
        return affine(x, angle, shift)
    angle, shift = draw_rotate_translate(b, h, w, degrees, translate, g, x.device)
    if degrees > 0:
        x = rotate_nearest(x, angle)
    if translate > 0:
        x = translate_nearest(x, shift)
    return x


def brightness_contrast(x: torch.Tensor, strength: float, g: torch.Generator, p: float = 0.8) -> torch.Tensor:
    b = x.shape[0]
    apply = (_uniform((b,), g, x.device) < p)[:, None, None, None]
    bright = _uniform((b, 1, 1, 1), g, x.device, 1 - strength, 1 + strength)
    contrast = _uniform((b, 1, 1, 1), g, x.device, 1 - strength, 1 + strength)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    jittered = ((x * bright - mean) * contrast + mean).clamp(0, 1)
    return torch.where(apply, jittered, x)


def colour_jitter(x: torch.Tensor, strength: float, hue: float, g: torch.Generator, p: float = 0.8) -> torch.Tensor:
    """Brightness, contrast, saturation and a hue-like channel mix, each drawn per image."""
    b = x.shape[0]
    out = brightness_contrast(x, strength, g, p=1.0)
    grey = out.mean(dim=1, keepdim=True)
    saturation = _uniform((b, 1, 1, 1), g, x.device, 1 - strength, 1 + strength)
    out = (grey + (out - grey) * saturation).clamp(0, 1)
    if out.shape[1] == 3 and hue > 0:
        angle = _uniform((b,), g, x.device, -hue, hue) * 2 * math.pi
        shift = torch.stack([torch.roll(out, k, dims=1) for k in (1, 2)])
        w = (1 - torch.cos(angle)) / 3
        out = (out * (1 - 2 * w)[:, None, None, None] + (shift[0] + shift[1]) * w[:, None, None, None]).clamp(0, 1)
    apply = (_uniform((b,), g, x.device) < p)[:, None, None, None]
    return torch.where(apply, out, x)


def random_grayscale(x: torch.Tensor, g: torch.Generator, p: float = 0.2) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)
    return torch.where((_uniform((x.shape[0],), g, x.device) < p)[:, None, None, None], grey, x)


def random_resized_crop(x: torch.Tensor, scale: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    """Crop a random area fraction in `scale` (aspect 3/4..4/3) and resize back to the input size."""
    b = x.shape[0]
    area = _uniform((b,), g, x.device, *scale)
    log_ratio = _uniform((b,), g, x.device, math.log(3 / 4), math.log(4 / 3))
    ratio = torch.exp(log_ratio)
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = _uniform((b,), g, x.device) * (1 - w) + w / 2
    cy = _uniform((b,), g, x.device) * (1 - h) + h / 2
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 1, 1] = w, h
    theta[:, 0, 2], theta[:, 1, 2] = 2 * cx - 1, 2 * cy - 1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def standard_augment(x: torch.Tensor, info: DatasetInfo, g: torch.Generator) -> torch.Tensor:
    """The training augmentation of the dataset: random crop with padding, plus a flip where it makes sense."""
    x = random_crop(x, info.crop_pad, g)
    if info.hflip:
        x = horizontal_flip(x, g)
    return x


def strong_augment(x: torch.Tensor, info: DatasetInfo, g: torch.Generator) -> torch.Tensor:
    """Contrastive (SupCon) views. 3-channel images get the SimCLR recipe (resized crop 0.2-1, flip, colour
    jitter 0.4/0.1 with p 0.8, greyscale p 0.2); 1-channel digits, where colour means nothing and flips change the
    digit, get their equivalent: small rotation, translation/crop, brightness and contrast."""
    if info.channels == 3:
        x = random_resized_crop(x, (0.2, 1.0), g)
        if info.hflip:
            x = horizontal_flip(x, g)
        x = colour_jitter(x, 0.4, 0.1, g, p=0.8)
        return random_grayscale(x, g, p=0.2)
    x = random_rotation(x, max(info.rotation_deg, 15.0), g)
    x = random_crop(x, max(info.crop_pad, 2), g)
    return brightness_contrast(x, 0.4, g, p=0.8)


def backdoor_pipeline_augment(
    x: torch.Tensor, info: DatasetInfo, g: torch.Generator, rotation_deg: float = 10.0
) -> torch.Tensor:
    """The GPU batch augmentation of the PBE/WaNet code bases: crop (padding 5 on 32 px, scaled) with p 0.8,
    rotation `rotation_deg` (10 in those code bases) with p 0.5, flip where the dataset allows it.
    rotation_deg 0 skips the rotation without drawing from the generator, so crop and flip are unchanged."""
    pad = max(1, round(5 * info.size / 32))
    x = random_crop(x, pad, g, p=0.8)
    x = random_rotation(x, rotation_deg, g, p=0.5)
    if info.hflip:
        x = horizontal_flip(x, g)
    return x
