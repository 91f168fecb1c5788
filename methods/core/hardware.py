"""What hardware a run would get, answered without importing torch where that is possible.

Validation and `--dry-run` ask how many GPUs there are (a GPU share no node can give is bad input) and which
device a run would use. Importing torch to answer costs about 2 s; a machine without a GPU driver has no GPU
torch could see, so there the answer needs no torch. Where a driver is present, or torch is loaded already,
torch itself is asked, so the answer is always the one the run will see.
"""

from __future__ import annotations

import ctypes
import os
import sys


def gpu_driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")  # NVIDIA's driver library, which torch's CUDA build loads to find GPUs
    except OSError:
        return os.path.exists("/dev/kfd")  # AMD's ROCm kernel driver, behind torch's ROCm build
    return True


def visible_gpu_count() -> int:
    """The GPUs torch sees in this process (CUDA_VISIBLE_DEVICES applied)."""
    if "torch" not in sys.modules and not gpu_driver_present():
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def default_device_name() -> str:
    """Where a run trains when nobody says: BDO_DEVICE if set (cpu, cuda, cuda:1), else the first visible GPU,
    else the CPU. The GPU is the target; the CPU is the reference path that tests pin with BDO_DEVICE=cpu."""
    requested = os.environ.get("BDO_DEVICE", "").strip()
    if requested:
        if requested.partition(":")[0] == "cuda" and visible_gpu_count() == 0:
            raise ValueError(f"BDO_DEVICE={requested!r}: no CUDA device is visible to this process; use cpu")
        return requested
    return "cuda" if visible_gpu_count() > 0 else "cpu"
