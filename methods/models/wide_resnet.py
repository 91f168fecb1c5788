"""Wide ResNets (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016): WRN-16-1 and WRN-40-2.

These are the teacher/student networks of the attention-distillation defenses (NAD, Li et al. ICLR 2021; ARGD,
Xia et al. AAAI 2022), which is why they are here: reproducing those papers needs their exact depth/width. A
WRN-d-k has a 3x3 stem of 16 channels and three groups of (d - 4) / 6 pre-activation blocks with 16k / 32k / 64k
channels at strides 1 / 2 / 2, then BN-ReLU, a global average pool and a linear layer. Dropout is left out, as in
the defenses' training recipes.

Stage features are the three groups' outputs, the last taken after the final BN-ReLU: attention transfer
(Zagoruyko & Komodakis, ICLR 2017) and NAD compute attention there, so the deepest map is the activated one the
classifier actually sees. The "late" part is the last group, the final BN and the classifier.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.core.registry import MODELS
from methods.data.configs import DatasetInfo
from methods.models.base import BackdoorModel


class WideBlock(nn.Module):
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
        # When the shape changes the reference implementation feeds the activated input to the projection too;
        # with equal shapes the shortcut must be the raw input to stay an identity path.
        skip = self.shortcut(pre) if self.shortcut is not None else x
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + skip


def _group(c_in: int, c_out: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [WideBlock(c_in, c_out, stride)]
    layers += [WideBlock(c_out, c_out, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class WideResNet(BackdoorModel):
    late_modules = ("block3", "final_bn", "classifier")

    def __init__(self, info: DatasetInfo, depth: int, width: int) -> None:
        super().__init__(info)
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {depth}")
        if width < 1:
            raise ValueError(f"WideResNet width must be >= 1, got {width}")
        n = (depth - 4) // 6
        channels = (16, 16 * width, 32 * width, 64 * width)
        self.depth, self.width = depth, width
        self.conv1 = nn.Conv2d(info.channels, channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = _group(channels[0], channels[1], n, 1)
        self.block2 = _group(channels[1], channels[2], n, 2)
        self.block3 = _group(channels[2], channels[3], n, 2)
        # Pre-activation blocks leave their sum un-normalised; this BN-ReLU is what the classifier reads.
        self.final_bn = nn.BatchNorm2d(channels[3])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = channels[3]
        self.classifier = nn.Linear(self.feature_dim, info.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # He-normal (fan-out) convs and a zero linear bias, as the WRN reference code does; the NAD/ARGD numbers
        # were obtained with this initialisation.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def stage_outputs(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        s1 = self.block1(self.conv1(x))
        s2 = self.block2(s1)
        s3 = F.relu(self.final_bn(self.block3(s2)))
        return [s1, s2, s3], self.pool(s3).flatten(1)


@MODELS.register("wrn16_1")
def wrn16_1(info: DatasetInfo) -> WideResNet:
    return WideResNet(info, depth=16, width=1)


@MODELS.register("wrn40_2")
def wrn40_2(info: DatasetInfo) -> WideResNet:
    return WideResNet(info, depth=40, width=2)
