"""Which device each part of a command trains on, and how much of a GPU a trial gets.

The rule a user can rely on: where a GPU is visible, bdo uses it without a flag.
- Single runs (`bdo attack`, `bdo defend`) and the attacks that `tune`, `study` and `quickstart` build on the
  driver train on `methods.core.training.default_device()`: BDO_DEVICE if set, else the first GPU, else the CPU.
- Trials get `--gpus-per-trial` of a GPU. Left unset (the default), the share is chosen once Ray knows the
  cluster (`auto_gpu_share`): none on a cluster without GPUs; otherwise the cluster's GPUs are divided among the
  trials that can run at once, at most MAX_TRIALS_PER_GPU per GPU and at most one GPU per trial, as fractions
  1/k so that trials pack evenly.
- `--gpus-per-trial 0` forces the CPU everywhere, the driver's attack build included.
- A share no node can give (more GPUs than any node has, or a fraction above 1) fails before any run starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from methods.core.hardware import default_device_name, visible_gpu_count
from orchestrator.errors import BadInput

if TYPE_CHECKING:  # pragma: no cover
    import torch

# Small models at the methods' batch sizes leave most of a large GPU idle (benchmarks share4); more than this
# many trials per GPU mostly add CUDA contexts and memory without adding throughput.
MAX_TRIALS_PER_GPU = 4


def pick_device(gpus: float | None = None) -> torch.device:
    """A run's device: the default device when the share is unset, the CPU for a share of 0, else the GPU."""
    import torch  # here, not at the top: validation and --dry-run use this module without torch

    from methods.core.training import default_device

    if gpus is None:
        return default_device()
    if gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def check_gpu_request(gpus: float | None, node_gpus: list[float], where: str = "--gpus-per-trial") -> None:
    """Refuse a share that no node can give: Ray would otherwise wait for it forever."""
    if gpus is None or gpus == 0:
        return
    if gpus > 1 and not float(gpus).is_integer():
        raise BadInput(f"{where} {gpus:g}: above 1 a trial takes whole GPUs (2, 4, ...); fractions are for sharing one")
    most = max(node_gpus, default=0.0)
    if gpus > most:
        have = "no node has a GPU" if most == 0 else f"the largest node has {most:g}"
        raise BadInput(f"{where} {gpus:g}: {have}; use --gpus-per-trial 0 for CPU trials or at most {most:g}")


@dataclass(frozen=True)
class ClusterShape:
    """What the share rule needs to know about the cluster: GPUs and CPUs per alive node."""

    node_gpus: tuple[float, ...]
    node_cpus: tuple[float, ...]

    @staticmethod
    def local(num_cpus: float | None = None) -> ClusterShape:
        import os

        return ClusterShape((float(visible_gpu_count()),), (float(num_cpus or os.cpu_count() or 1),))

    @staticmethod
    def from_ray() -> ClusterShape:
        import ray

        alive = [n for n in ray.nodes() if n.get("Alive")]
        return ClusterShape(
            tuple(float(n["Resources"].get("GPU", 0.0)) for n in alive),
            tuple(float(n["Resources"].get("CPU", 0.0)) for n in alive),
        )


def auto_gpu_share(shape: ClusterShape, concurrent: int, cpus_per_trial: float) -> float:
    """The default GPU share of a trial (see the module docstring)."""
    gpus = sum(shape.node_gpus)
    if gpus == 0:
        return 0.0
    cpu_slots = sum(math.floor(c / cpus_per_trial) for c in shape.node_cpus) if cpus_per_trial > 0 else concurrent
    slots = max(1, min(concurrent, cpu_slots or 1))
    per_gpu = min(MAX_TRIALS_PER_GPU, math.ceil(slots / gpus))
    return 1.0 / per_gpu


def resolve_gpus(plan, shape: ClusterShape):
    """The plan with a concrete gpus_per_trial: the user's, checked against the cluster, or the automatic share."""
    if plan.gpus_per_trial is not None:
        check_gpu_request(plan.gpus_per_trial, list(shape.node_gpus))
        return plan
    concurrent = plan.max_concurrent or plan.num_samples
    share = auto_gpu_share(shape, concurrent, plan.cpus_per_trial)
    if plan.workers_per_trial > 1 and share > 0:
        share = float(min(plan.workers_per_trial, max(shape.node_gpus)))  # DDP: a GPU per worker where there are
    return replace(plan, gpus_per_trial=share)


def driver_device_name(plan) -> str:
    """Where the driver builds a sweep's attack: the CPU when the user forced CPU trials, else the default. A name,
    which --dry-run prints without importing torch."""
    return "cpu" if plan.gpus_per_trial == 0 else default_device_name()


def driver_device(plan) -> torch.device:
    import torch

    return torch.device(driver_device_name(plan))
