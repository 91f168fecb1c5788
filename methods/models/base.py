"""The model interface every method relies on.

A model takes float images in [0, 1] (B, C, H, W) and normalises them itself, so pixel-space epsilons mean what
they say. `forward_features` returns the three stage outputs (attention distillation), the penultimate feature
(FCT, SupCon) and the logits; `late_modules` names the submodules that form the model's "late" part (ASD's
meta split trains only those); `classifier` is the final linear layer and `feature_dim` its input width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from methods.core.registry import MODELS
from methods.data.configs import DatasetInfo


@dataclass
class Features:
    stages: list[torch.Tensor]  # three stage outputs, (B, C_i, H_i, W_i), increasing depth
    penultimate: torch.Tensor  # (B, feature_dim)
    logits: torch.Tensor  # (B, num_classes)


class Normalize(nn.Module):
    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class BackdoorModel(nn.Module):
    """Base class: subclasses implement `stage_outputs(x_normalised) -> (stages, penultimate)` and set
    `self.classifier`, `self.feature_dim` and `late_modules`."""

    late_modules: tuple[str, ...] = ()
    feature_dim: int
    classifier: nn.Linear

    def __init__(self, info: DatasetInfo) -> None:
        super().__init__()
        self.normalize = Normalize(info.mean, info.std)

    def stage_outputs(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> Features:
        stages, penultimate = self.stage_outputs(self.normalize(x))
        return Features(stages, penultimate, self.classifier(penultimate))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage_outputs(self.normalize(x))[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def late_parameters(self) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for name in self.late_modules:
            params.extend(self.get_submodule(name).parameters())
        return params


def build_model(name: str, info: DatasetInfo) -> BackdoorModel:
    return MODELS.get(name)(info)
