"""Datasets that need no download: scikit-learn's bundled handwritten digits, and a procedural synthetic set."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from methods.core.registry import DATASETS
from methods.data.base import RawDataset
from methods.data.configs import DIGITS_INFO, SYNTHETIC_INFO, DataConfig


@DATASETS.register("digits")
def digits(data_root=None, download=False, cfg: DataConfig | None = None) -> RawDataset:
    """scikit-learn's 1,797 8x8 digits (values 0..16), scaled to 0..255 and resized to 16x16.

    There is no official test split, so a fixed 20% (seeded, independent of the run's seeds) becomes the test
    set; `load_splits` then holds out 12.5% of the remaining 80% for validation: 70/10/20 overall.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) * (255.0 / 16.0)).unsqueeze(1)
    images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    images = images.round().clamp(0, 255).to(torch.uint8)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(20240521))
    n_test = int(round(0.2 * len(labels)))
    test, train = order[:n_test].sort().values, order[n_test:].sort().values
    return RawDataset(DIGITS_INFO, images[train], labels[train], images[test], labels[test])


def synthetic_images(
    n: int, seed: int, num_classes: int = 10, size: int = 32, difficulty: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable CIFAR-shaped set: each class is an oriented grating with its own frequency and colour, drawn
    at a random phase, contrast and position with pixel noise and a random background tint, so a small CNN has
    to learn orientation/frequency/colour rather than memorise pixels.

    `difficulty` (DataConfig.synthetic_difficulty) widens each class's spread of orientation and frequency,
    mixes a random colour into the class colour and adds pixel noise, so neighbouring classes overlap and
    some images are genuinely ambiguous: at 0 a small CNN reaches test ACC 1.0 within a few epochs, which
    leaves no room to see the accuracy a defense costs. Every random number is drawn whatever the difficulty,
    so a seed gives the same labels, positions and phases at every difficulty and only the overlap changes."""
    if difficulty is None:
        difficulty = DataConfig().synthetic_difficulty
    d = float(difficulty)
    g = torch.Generator().manual_seed(int(seed))
    class_g = torch.Generator().manual_seed(7)  # class definitions are fixed for every seed
    angles = torch.arange(num_classes, dtype=torch.float32) * (math.pi / num_classes)
    freqs = 2.0 + 4.0 * torch.rand(num_classes, generator=class_g)
    colours = 0.35 + 0.65 * torch.rand(num_classes, 3, generator=class_g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    coords = torch.linspace(-1.0, 1.0, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    out = torch.empty(n, 3, size, size, dtype=torch.uint8)
    chunk = 4096
    for start in range(0, n, chunk):
        y = labels[start : start + chunk]
        b = len(y)
        # Class spacing is pi/10 = 0.31 rad in orientation; at difficulty 1 the spread (0.45 rad) reaches the
        # neighbours on both sides, so orientation alone no longer names the class.
        angle = angles[y] + (0.15 + 0.3 * d) * torch.randn(b, generator=g)
        phase = 2 * math.pi * torch.rand(b, generator=g)
        shift = 0.3 * torch.randn(b, 2, generator=g)
        freq = freqs[y] * torch.exp(0.3 * d * torch.randn(b, generator=g))
        proj = (xx[None] - shift[:, 0, None, None]) * torch.cos(angle)[:, None, None] + (
            yy[None] - shift[:, 1, None, None]
        ) * torch.sin(angle)[:, None, None]
        wave = torch.sin(freq[:, None, None] * math.pi * proj + phase[:, None, None])
        envelope = torch.exp(-((xx[None] - shift[:, 0, None, None]) ** 2 + (yy[None] - shift[:, 1, None, None]) ** 2))
        contrast = 0.6 + 0.4 * torch.rand(b, 1, 1, 1, generator=g)
        tint = 0.3 * torch.rand(b, 3, 1, 1, generator=g)
        # Up to `d` of the colour comes from a random colour of the same brightness range, so colour is a
        # strong cue for some images and a weak one for others.
        mix = d * torch.rand(b, 1, generator=g)
        stray = 0.35 + 0.65 * torch.rand(b, 3, generator=g)
        colour = (1 - mix) * colours[y] + mix * stray
        img = tint + contrast * colour[:, :, None, None] * (0.5 + 0.5 * wave * envelope)[:, None]
        img = img + (0.08 + 0.12 * d) * torch.randn(b, 3, size, size, generator=g)
        out[start : start + b] = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return out, labels


@DATASETS.register("synthetic")
def synthetic(data_root=None, download=False, cfg: DataConfig | None = None) -> RawDataset:
    cfg = cfg or DataConfig()
    x_train, y_train = synthetic_images(cfg.synthetic_train, seed=1, difficulty=cfg.synthetic_difficulty)
    x_test, y_test = synthetic_images(cfg.synthetic_test, seed=2, difficulty=cfg.synthetic_difficulty)
    return RawDataset(SYNTHETIC_INFO, x_train, y_train, x_test, y_test)
