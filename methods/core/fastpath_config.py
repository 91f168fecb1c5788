"""The fast path's switches (`fast.KEY` of `--set`), torch-free so that they are validated without importing
torch; methods.core.fastpath applies them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from methods.core.config import Config, choice

if TYPE_CHECKING:  # pragma: no cover
    import torch

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class FastPath(Config):
    """Each switch: true, false, or null (the default) for on where the device is CUDA and off elsewhere."""

    bf16: bool | None = None  # bf16 autocast of the training forward pass
    channels_last: bool | None = None  # channels_last memory format for 4-d weights and inputs
    cudnn_benchmark: bool | None = None  # let cuDNN pick the fastest convolution algorithms
    compile: bool = False  # torch.compile the training forward (and so its backward)
    compile_mode: str = choice(
        "default", COMPILE_MODES, "torch.compile mode; reduce-overhead captures CUDA graphs (CUDA only)"
    )

    def wants(self, switch: str, device: torch.device) -> bool:
        import torch  # only runs ask: validating the switches needs no torch

        value = getattr(self, switch)
        return torch.device(device).type == "cuda" if value is None else value

    def resolved(self, device: torch.device | str) -> dict[str, Any]:
        """The switches as they apply on `device` (what an attack cache entry records about its build)."""
        import torch

        device = torch.device(device)
        out: dict[str, Any] = {s: self.wants(s, device) for s in ("bf16", "channels_last", "cudnn_benchmark")}
        out["compile"] = self.compile_mode if self.compile else False
        return out
