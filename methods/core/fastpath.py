"""The GPU fast path: speed switches for the training forward pass that leave a method's maths unchanged.

Every method trains through `ctx.wrap_model(model)`; the contexts pass the model through `accelerate` first, so
the switches apply to every method without any method knowing about them. On CUDA, by default: bf16 autocast of
the forward pass (loss and backward stay in fp32 on fp32 outputs), channels_last weights and activations, and
cudnn.benchmark. torch.compile is opt-in: its warm-up costs more than short runs gain. Its `reduce-overhead`
mode replays the forward and backward as CUDA graphs, which is what removes the kernel-launch cost that bounds a
batch-128 step on a large GPU; it is off by default until it has been measured on one (benchmarks/RESULTS.md).

A wrapped module may take any arguments and return any nesting of tuples, lists, dicts and dataclasses (NAD's
student returns logits, attention maps and an optional head loss): arguments pass through, 4-d floating inputs
become channels_last, and every floating tensor in the output comes back as fp32, None and integers untouched.

On CPU everything defaults off: the CPU path is the reference the fast path is compared against. Evaluation,
PGD and checkpoints see the plain fp32 model through `unwrap`, exactly as under DistributedDataParallel.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn

from methods.core.fastpath_config import FastPath


def to_fp32(value: Any) -> Any:
    """Every floating tensor inside `value` as fp32; containers rebuilt with the same type, anything else kept."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(to_fp32(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(to_fp32(v) for v in value)
    if isinstance(value, dict):
        return type(value)((k, to_fp32(v)) for k, v in value.items())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(
            value, **{f.name: to_fp32(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        )
    return value


class FastForward(nn.Module):
    """Runs `module`'s forward under the chosen switches and returns fp32 outputs. `module` is what `unwrap`
    returns, so state_dict, evaluation and checkpoints see the plain model.

    A compiled forward runs only on batches of the size it first saw in training mode; any other batch (an
    epoch's last partial batch, an evaluation batch) goes through the eager module. The maths is the same, and
    neither a recompilation nor a second CUDA graph is paid for the odd batch out."""

    def __init__(
        self,
        module: nn.Module,
        device_type: str,
        bf16: bool,
        channels_last: bool,
        compile_model: bool,
        compile_mode: str = "default",
    ):
        super().__init__()
        self.module = module
        self.device_type, self.bf16, self.channels_last = device_type, bf16, channels_last
        self.compiled_batch: int | None = None
        # Kept outside the module tree so the compiled wrapper never appears in state_dict.
        compiled = (
            torch.compile(module, mode=None if compile_mode == "default" else compile_mode) if compile_model else None
        )
        object.__setattr__(self, "_compiled", compiled)

    def _route(self, args: tuple) -> nn.Module:
        if self._compiled is None or not args or not isinstance(args[0], torch.Tensor):
            return self.module
        if not self.training:
            return self.module
        batch = args[0].shape[0]
        if self.compiled_batch is None:
            self.compiled_batch = batch
        return self._compiled if batch == self.compiled_batch else self.module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.channels_last:
            args = tuple(
                a.contiguous(memory_format=torch.channels_last)
                if isinstance(a, torch.Tensor) and a.dim() == 4 and a.is_floating_point()
                else a
                for a in args
            )
        forward = self._route(args)
        if not self.bf16:
            return forward(*args, **kwargs)
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            out = forward(*args, **kwargs)
        return to_fp32(out)


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
    return FastForward(model, device.type, bf16, channels_last, fast.compile, fast.compile_mode)
