"""VGG-16 with batch norm (Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition", ICLR 2015; BN after every conv as in Ioffe & Szegedy 2015).

The thirteen 3x3 convs keep configuration D's 64/128/256/512/512 channels in five blocks, each ending in a 2x2
max-pool. The ImageNet head (two 4096-wide layers on a 7x7 map) is replaced by an adaptive average pool and one
512 -> num_classes linear layer, the usual CIFAR form, because the inputs here are 16x16 to 64x64: a fixed-size
flatten would tie the model to one resolution. A pool is skipped once the map is already 1x1 (a 16x16 digit
reaches 1x1 after four pools), so every input size gets through all thirteen convs.

Stage features are the outputs of blocks 3, 4 and 5 (after their pools): the three deepest blocks, matching the
"last three stages" used for the ResNets. The "late" part is blocks 4 and 5 plus the classifier, mirroring the
ResNets' layer3 + layer4 + linear split.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.core.registry import MODELS
from methods.data.configs import DatasetInfo
from methods.models.base import BackdoorModel

_VGG16_BLOCKS: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class FloorPool(nn.Module):
    """2x2 max-pool that leaves a map alone once a side is below 2, so small inputs never pool to 0x0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] < 2 or x.shape[-2] < 2:
            return x
        return F.max_pool2d(x, 2)


def _block(c_in: int, widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_out in widths:
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        c_in = c_out
    layers.append(FloorPool())
    return nn.Sequential(*layers)


class VGG(BackdoorModel):
    late_modules = ("block4", "block5", "classifier")

    def __init__(self, info: DatasetInfo, blocks: tuple[tuple[int, ...], ...] = _VGG16_BLOCKS) -> None:
        super().__init__(info)
        if len(blocks) != 5:
            raise ValueError(f"VGG expects five conv blocks, got {len(blocks)}")
        ins = (info.channels,) + tuple(widths[-1] for widths in blocks[:-1])
        self.block1 = _block(ins[0], blocks[0])
        self.block2 = _block(ins[1], blocks[1])
        self.block3 = _block(ins[2], blocks[2])
        self.block4 = _block(ins[3], blocks[3])
        self.block5 = _block(ins[4], blocks[4])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = blocks[-1][-1]
        self.classifier = nn.Linear(self.feature_dim, info.num_classes)

    def stage_outputs(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        out = self.block2(self.block1(x))
        s3 = self.block3(out)
        s4 = self.block4(s3)
        s5 = self.block5(s4)
        return [s3, s4, s5], self.pool(s5).flatten(1)


@MODELS.register("vgg16_bn")
def vgg16_bn(info: DatasetInfo) -> VGG:
    return VGG(info, _VGG16_BLOCKS)
