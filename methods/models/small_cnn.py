"""A small CNN for CPU tests and quick sweeps: three conv stages (conv-BN-ReLU twice, then pool) and a linear head."""

from __future__ import annotations

import torch
import torch.nn as nn

from methods.core.registry import MODELS
from methods.data.configs import DatasetInfo
from methods.models.base import BackdoorModel


def _stage(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class SmallCNN(BackdoorModel):
    late_modules = ("stage3", "classifier")

    def __init__(self, info: DatasetInfo, width: int = 16) -> None:
        super().__init__(info)
        self.stage1 = _stage(info.channels, width, pool=True)
        self.stage2 = _stage(width, 2 * width, pool=True)
        self.stage3 = _stage(2 * width, 4 * width, pool=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 4 * width
        self.classifier = nn.Linear(self.feature_dim, info.num_classes)

    def stage_outputs(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        s1 = self.stage1(x)
        s2 = self.stage2(s1)
        s3 = self.stage3(s2)
        return [s1, s2, s3], self.pool(s3).flatten(1)


@MODELS.register("small_cnn")
def small_cnn(info: DatasetInfo) -> SmallCNN:
    return SmallCNN(info)
