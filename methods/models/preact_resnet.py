"""PreAct ResNet-18 (He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016), CIFAR style.

Pre-activation blocks (BN-ReLU before each conv) keep the skip path a pure identity, which is why this is the
default victim network of the backdoor benchmarks (BackdoorBench and most attack papers train it on CIFAR-10).
The stem is a single 3x3 stride-1 conv with no max-pool so 32x32 and 16x16 inputs are not shrunk before the first
stage; the four stages have 64/128/256/512 channels with two blocks each and end in an adaptive average pool, so
64x64 inputs work unchanged.

Like the benchmark implementation this model mirrors, there is no BN-ReLU between layer4 and the pool (the paper
adds one); keeping the benchmark's form keeps clean and attack-success numbers comparable with published ones.

Stage features for attention distillation are the outputs of layer2, layer3 and layer4 (the last three stages,
as for ResNet-18); they are the un-activated residual sums, which is what a pre-activation network passes on.
The "late" part is layer3 + layer4 + the classifier, the split ASD trains in its meta-split step.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.core.registry import MODELS
from methods.data.configs import DatasetInfo
from methods.models.base import BackdoorModel


class PreActBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        # A projection shortcut reads the activated input (as in the paper) so both branches see normalised
        # features; an identity shortcut must take the raw input to stay a clean identity path.
        skip = self.shortcut(pre) if self.shortcut is not None else x
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


def _layer(c_in: int, c_out: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [PreActBlock(c_in, c_out, stride)]
    layers += [PreActBlock(c_out, c_out, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class PreActResNet(BackdoorModel):
    late_modules = ("layer3", "layer4", "classifier")

    def __init__(self, info: DatasetInfo, blocks: tuple[int, int, int, int] = (2, 2, 2, 2)) -> None:
        super().__init__(info)
        # No BN after the stem: the first block's own BN-ReLU pre-activates it.
        self.conv1 = nn.Conv2d(info.channels, 64, 3, stride=1, padding=1, bias=False)
        self.layer1 = _layer(64, 64, blocks[0], 1)
        self.layer2 = _layer(64, 128, blocks[1], 2)
        self.layer3 = _layer(128, 256, blocks[2], 2)
        self.layer4 = _layer(256, 512, blocks[3], 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 512
        self.classifier = nn.Linear(self.feature_dim, info.num_classes)

    def stage_outputs(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        out = self.layer1(self.conv1(x))
        s2 = self.layer2(out)
        s3 = self.layer3(s2)
        s4 = self.layer4(s3)
        return [s2, s3, s4], self.pool(s4).flatten(1)


@MODELS.register("preact_resnet18")
def preact_resnet18(info: DatasetInfo) -> PreActResNet:
    return PreActResNet(info, (2, 2, 2, 2))
