"""Tensor datasets: uint8 (N, C, H, W) images with int64 labels, split into train / val / test.

A dataset builder returns the official train and test parts; `load_splits` carves the validation split out of
the training part with its own seed, before any poisoning. Images stay uint8 until a batch is fed to a model,
which normalises inside itself, so pixel-space epsilons and triggers mean what they say.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from methods.core.registry import DATASETS
from methods.data.configs import DataConfig, DatasetInfo, default_data_root


@dataclass
class RawDataset:
    info: DatasetInfo
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass
class Splits:
    info: DatasetInfo
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    train_index: torch.Tensor  # positions of the training images in the builder's training part
    split_seed: int = 0

    def to(self, device: torch.device) -> Splits:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return Splits(**moved)


class MissingDataError(FileNotFoundError):
    """A dataset's files are not where they should be; the message names the path and the flag that fetches them."""


Builder = Callable[..., RawDataset]


def load_raw(
    name: str, data_root: Path | None = None, download: bool = False, cfg: DataConfig | None = None
) -> RawDataset:
    cfg = cfg or DataConfig()
    builder = DATASETS.get(name)
    raw: RawDataset = builder(data_root=Path(data_root or default_data_root()), download=download, cfg=cfg)
    if cfg.test_limit is not None:
        raw.x_test, raw.y_test = raw.x_test[: cfg.test_limit], raw.y_test[: cfg.test_limit]
    return raw


def load_splits(
    name: str,
    split_seed: int,
    data_root: Path | None = None,
    download: bool = False,
    cfg: DataConfig | None = None,
) -> Splits:
    cfg = cfg or DataConfig()
    raw = load_raw(name, data_root, download, cfg)
    n = len(raw.y_train)
    generator = torch.Generator().manual_seed(int(split_seed))
    order = torch.randperm(n, generator=generator)
    fraction = raw.info.val_fraction if cfg.val_fraction is None else cfg.val_fraction
    n_val = int(round(fraction * n))
    val_index, train_index = order[:n_val].sort().values, order[n_val:].sort().values
    if cfg.train_limit is not None:
        train_index = train_index[: cfg.train_limit]
    return Splits(
        info=raw.info,
        x_train=raw.x_train[train_index].contiguous(),
        y_train=raw.y_train[train_index].contiguous(),
        x_val=raw.x_train[val_index].contiguous(),
        y_val=raw.y_train[val_index].contiguous(),
        x_test=raw.x_test.contiguous(),
        y_test=raw.y_test.contiguous(),
        train_index=train_index,
        split_seed=int(split_seed),
    )


def to_uint8_nchw(images: torch.Tensor) -> torch.Tensor:
    """(N,H,W) or (N,H,W,C) arrays of any integer type -> contiguous uint8 (N,C,H,W)."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    elif images.dim() == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.permute(0, 3, 1, 2)
    return images.to(torch.uint8).contiguous()
