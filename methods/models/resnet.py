"""ResNet-18 (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016) with the CIFAR stem.

The ImageNet stem (7x7 stride-2 conv and a max-pool) would shrink a 32x32 image to 8x8 before the first residual
stage and a 16x16 digit to 4x4, so, as the backdoor literature does for CIFAR-sized data, the stem is a single 3x3
stride-1 conv and there is no max-pool. The four stages keep the paper's 64/128/256/512 channels and two
BasicBlocks each; the pool is adaptive so 64x64 inputs need no change.

Stage features for attention distillation are the outputs of layer2, layer3 and layer4: layer1 sits at full
resolution and carries mostly low-level edges, while the last three stages are the ones NAD-style attention
transfer matches on ResNets. The "late" part is layer3 + layer4 + the classifier, the split ASD trains in its
meta-split step.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.core.registry import MODELS
from methods.data.configs import DatasetInfo
from methods.models.base import BackdoorModel


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        # Project only where the residual changes shape; elsewhere the identity keeps the gradient path clean.
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                nn.BatchNorm2d(c_out),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _layer(c_in: int, c_out: int, blocks: int, stride: int) -> nn.Sequential:
    # Only the first block of a stage downsamples, as in the paper.
    layers = [BasicBlock(c_in, c_out, stride)]
    layers += [BasicBlock(c_out, c_out, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNet(BackdoorModel):
    late_modules = ("layer3", "layer4", "classifier")

    def __init__(self, info: DatasetInfo, blocks: tuple[int, int, int, int] = (2, 2, 2, 2)) -> None:
        super().__init__(info)
        self.conv1 = nn.Conv2d(info.channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = _layer(64, 64, blocks[0], 1)
        self.layer2 = _layer(64, 128, blocks[1], 2)
        self.layer3 = _layer(128, 256, blocks[2], 2)
        self.layer4 = _layer(256, 512, blocks[3], 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 512
        self.classifier = nn.Linear(self.feature_dim, info.num_classes)

    def stage_outputs(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        s2 = self.layer2(out)
        s3 = self.layer3(s2)
        s4 = self.layer4(s3)
        return [s2, s3, s4], self.pool(s4).flatten(1)


@MODELS.register("resnet18")
def resnet18(info: DatasetInfo) -> ResNet:
    return ResNet(info, (2, 2, 2, 2))
