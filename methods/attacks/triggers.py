"""Triggers: pure functions on uint8 image batches (B, C, H, W), wrapped in small serialisable objects.

A trigger is rebuilt from (kind, params, tensors) alone, so a cached backdoor (and a defense evaluating it on
another node) applies exactly the trigger the attack trained with. `apply(x, test=...)` never changes dtype,
keeps values in 0..255, and touches only the pixels the trigger defines.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

ASSETS = Path(__file__).resolve().parent.parent / "assets"


# ----------------------------------------------------------------------------------------------- pure functions
def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """Replace the pixels where mask (1|C, H, W) is set by pattern (C, H, W)."""
    return torch.where(mask.bool().unsqueeze(0), pattern.to(x.dtype).unsqueeze(0), x)


def blend(x: torch.Tensor, pattern: torch.Tensor, alpha: float) -> torch.Tensor:
    """x' = clip((1 - alpha) x + alpha P); pattern broadcasts over the batch or matches it image by image."""
    p = pattern.float() if pattern.dim() == 4 else pattern.float().unsqueeze(0)
    return ((1.0 - alpha) * x.float() + alpha * p).round().clamp(0, 255).to(torch.uint8)


def add_signal(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """x' = clip(x + delta), delta (C|1, H, W) float in pixel units."""
    return (x.float() + delta.float().unsqueeze(0)).round().clamp(0, 255).to(torch.uint8)


def warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """grid_sample with a (H, W, 2) or (B, H, W, 2) sampling grid in [-1, 1]."""
    g = grid.unsqueeze(0).expand(x.shape[0], -1, -1, -1) if grid.dim() == 3 else grid
    out = F.grid_sample(x.float(), g.to(torch.float32), mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------- pattern makers
def grid_pattern(channels: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 3x3 corner checkerboard of D-BR/NAD/PBE in the bottom-right corner. Bottom row, right to left:
    255, 0, 255; middle: 0, 255, 0; third from the bottom: 255, 0, 0."""
    block = torch.tensor([[0, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    pattern = torch.zeros(channels, size, size, dtype=torch.uint8)
    mask[:, size - 3 :, size - 3 :] = True
    pattern[:, size - 3 :, size - 3 :] = block
    return mask, pattern


def square_pattern(channels: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A white square of side 10% of the image (at least 2 px), 1 px from the bottom-right border."""
    side = max(2, round(0.1 * size))
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    mask[:, size - 1 - side : size - 1, size - 1 - side : size - 1] = True
    return mask, torch.full((channels, size, size), 255, dtype=torch.uint8)


def four_corner_pattern(channels: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The corner checkerboard stamped in all four corners (mirrored so each reads the same from its corner)."""
    mask, pattern = grid_pattern(channels, size)
    masks, patterns = [mask], [pattern]
    for dims in ((-1,), (-2,), (-1, -2)):
        masks.append(mask.flip(dims))
        patterns.append(pattern.flip(dims))
    full_mask = torch.stack(masks).any(0)
    full_pattern = torch.zeros_like(pattern)
    for m, p in zip(masks, patterns):
        full_pattern = torch.where(m, p, full_pattern)
    return full_mask, full_pattern


def image_file_pattern(path: str | Path, channels: int, size: int) -> torch.Tensor:
    """A user-supplied image file as a (C, size, size) uint8 pattern."""
    from PIL import Image

    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"trigger image {path} does not exist")
    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def stripe_pattern(channels: int, size: int) -> torch.Tensor:
    """D-BR's Blend-Strip signal: vertical stripes of a sinusoid with amplitude 20 and period 8 px stored as
    uint8 with wrap-around, i.e. columns alternate in blocks of about 4 between ~0..19 and ~237..255."""
    cols = torch.arange(size, dtype=torch.float64)
    values = torch.round(20 * torch.sin(2 * math.pi * cols / 8)).to(torch.int64) % 256
    return values.to(torch.uint8).view(1, 1, size).expand(channels, size, size).contiguous()


def random_pattern(channels: int, size: int, seed: int) -> torch.Tensor:
    """A fixed, seeded uniform-noise pattern (the 'generated pattern' blend trigger)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, 256, (channels, size, size), generator=g, dtype=torch.int64).to(torch.uint8)


def trojan_patch(channels: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The project's fixed Trojan-style additive patch (assets/trojan_patch.npy, 3x3x3, values 4..250), placed
    where TrojanNN's patch sits on 32x32 images (rows/cols 25..27, i.e. size-7..size-5). 1-channel images
    get the channel mean."""
    patch = torch.from_numpy(np.load(ASSETS / "trojan_patch.npy").astype(np.float32))  # (3, 3, 3)
    if channels == 1:
        patch = patch.mean(0, keepdim=True)
    elif channels != 3:
        patch = patch.mean(0, keepdim=True).expand(channels, 3, 3)
    delta = torch.zeros(channels, size, size)
    r = size - 7
    delta[:, r : r + 3, r : r + 3] = patch
    return delta, (delta != 0).any(0, keepdim=True)


def sig_signal(channels: int, size: int, amplitude: float, frequency: float) -> torch.Tensor:
    """SIG: v(i, j) = D sin(2 pi j f / m), constant down each column, the same on every channel."""
    cols = torch.arange(size, dtype=torch.float32)
    row = amplitude * torch.sin(2 * math.pi * cols * frequency / size)
    return row.view(1, 1, size).expand(channels, size, size).contiguous()


def wanet_grids(size: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """WaNet's identity grid and upsampled noise grid; returns (identity_grid, noise_grid), each (H, W, 2). The
    strength and rescale apply later (wanet_backdoor_grid), so the grids depend on the size, k and seed only."""
    g = torch.Generator().manual_seed(int(seed))
    control = torch.rand(1, 2, k, k, generator=g) * 2 - 1
    control = control / control.abs().mean()
    noise = F.interpolate(control, size=(size, size), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)[0]
    coords = torch.linspace(-1, 1, size)
    xx, yy = torch.meshgrid(coords, coords, indexing="xy")
    identity = torch.stack([xx, yy], dim=-1)
    return identity, noise


def wanet_backdoor_grid(identity: torch.Tensor, noise: torch.Tensor, s: float, grid_rescale: float) -> torch.Tensor:
    size = identity.shape[0]
    return ((identity + s * noise / size) * grid_rescale).clamp(-1, 1)


def wanet_noise_grids(backdoor_grid: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Noise-mode grids: the backdoor grid plus U(-1, 1)/H per sample, clamped (samples keep their label)."""
    size = backdoor_grid.shape[0]
    jitter = (torch.rand(n, size, size, 2, generator=generator) * 2 - 1) / size
    return (backdoor_grid.unsqueeze(0) + jitter).clamp(-1, 1)


# ------------------------------------------------------------------------------------------------ trigger objects
class Trigger:
    kind: ClassVar[str]

    def __init__(self, params: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.params = dict(params)
        self.tensors = {k: v.cpu() for k, v in tensors.items()}
        self._device_cache: dict[tuple[str, str], torch.Tensor] = {}

    def _t(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, str(device))
        if key not in self._device_cache:
            self._device_cache[key] = self.tensors[name].to(device)
        return self._device_cache[key]

    def apply(self, x: torch.Tensor, test: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def preview_pattern(self) -> torch.Tensor:
        """What the trigger does to a mid-grey image, for trigger.png."""
        size = self.params["size"]
        grey = torch.full((1, self.params["channels"], size, size), 128, dtype=torch.uint8)
        return self.apply(grey, test=True)[0]


class PatchTrigger(Trigger):
    kind = "patch"

    def apply(self, x, test=False, generator=None):
        return stamp(x, self._t("mask", x.device), self._t("pattern", x.device))


class BlendTrigger(Trigger):
    """Blend with a fixed pattern, or with fresh uniform noise per image (params['noise'])."""

    kind = "blend"

    def apply(self, x, test=False, generator=None):
        alpha = self.params["alpha_test" if test else "alpha"]
        if self.params.get("noise"):
            if generator is None:
                generator = torch.Generator(device=x.device).manual_seed(int(self.params["noise_seed"]))
            noise = torch.randint(0, 256, x.shape, generator=generator, device=x.device, dtype=torch.int64)
            return blend(x, noise.to(torch.uint8), alpha)
        return blend(x, self._t("pattern", x.device), alpha)


class AdditiveTrigger(Trigger):
    """Trojan and SIG: a fixed additive signal, optionally stronger at test time (SIG's 40 / 60)."""

    kind = "additive"

    def apply(self, x, test=False, generator=None):
        name = "delta_test" if test and "delta_test" in self.tensors else "delta"
        return add_signal(x, self._t(name, x.device))


class WarpTrigger(Trigger):
    kind = "warp"

    def apply(self, x, test=False, generator=None):
        return warp(x, self._t("grid", x.device))


TRIGGER_KINDS: dict[str, type[Trigger]] = {
    cls.kind: cls for cls in (PatchTrigger, BlendTrigger, AdditiveTrigger, WarpTrigger)
}


def trigger_from_state(kind: str, params: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Trigger:
    try:
        cls = TRIGGER_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown trigger kind {kind!r}; known: {', '.join(sorted(TRIGGER_KINDS))}") from None
    return cls(params, tensors)
