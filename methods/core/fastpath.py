"""The GPU fast path: speed switches for the training forward pass that leave a method's maths unchanged.

Every method trains through `ctx.wrap_model(model)`; the contexts pass the model through `accelerate` first, so
the switches apply to every method without any method knowing about them. On CUDA, by default: bf16 autocast of
the forward pass (loss and backward stay in fp32 on fp32 logits), channels_last weights and activations, and
cudnn.benchmark; torch.compile is opt-in (its warm-up costs more than short runs gain). Data already lives on the
device as uint8 and is augmented there in batches, and train_epoch never syncs with the host inside its loop.

On CPU everything defaults off: the CPU path is the reference the fast path is compared against (tests that run
only where CUDA exists compare the two). Evaluation, PGD and checkpoints see the plain fp32 model through
`unwrap`, exactly as under DistributedDataParallel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from methods.core.config import Config


@dataclass
class FastPath(Config):
    """Each switch: true, false, or null (the default) for on where the device is CUDA and off elsewhere."""

    bf16: Optional[bool] = None  # bf16 autocast of the training forward pass
    channels_last: Optional[bool] = None  # channels_last memory format for 4-d weights and inputs
    cudnn_benchmark: Optional[bool] = None  # let cuDNN pick the fastest convolution algorithms
    compile: bool = False  # torch.compile the training forward

    def wants(self, switch: str, device: torch.device) -> bool:
        value = getattr(self, switch)
        return torch.device(device).type == "cuda" if value is None else value


class FastForward(nn.Module):
    """Runs `module`'s forward under the chosen switches and returns fp32 outputs. `module` is what `unwrap`
    returns, so state_dict, evaluation and checkpoints see the plain model."""

    def __init__(self, module: nn.Module, device_type: str, bf16: bool, channels_last: bool, compile_model: bool):
        super().__init__()
        self.module = module
        self.device_type, self.bf16, self.channels_last = device_type, bf16, channels_last
        # Kept outside the module tree so the compiled wrapper never appears in state_dict.
        object.__setattr__(self, "_forward", torch.compile(module) if compile_model else module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if not self.bf16:
            return self._forward(x)
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            out = self._forward(x)
        return out.float()


def accelerate(model: nn.Module, device: torch.device | str, fast: FastPath | None) -> nn.Module:
    """The model to train with under `fast`: the model itself when no switch applies on this device."""
    fast = fast or FastPath()
    device = torch.device(device)
    if fast.wants("cudnn_benchmark", device):
        torch.backends.cudnn.benchmark = True
    bf16, channels_last = fast.wants("bf16", device), fast.wants("channels_last", device)
    if not (bf16 or channels_last or fast.compile):
        return model
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return FastForward(model, device.type, bf16, channels_last, fast.compile)
