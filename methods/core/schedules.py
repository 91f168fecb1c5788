"""Learning-rate schedules and setting the rate: plain arithmetic, no torch import, so configs (torch-free) can
compute their schedules with the same functions the methods train with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def scaled_steps(step_epochs: Sequence[int], reference_epochs: int, epochs: int) -> list[int]:
    """Step epochs given for a `reference_epochs` schedule, moved proportionally onto one of `epochs`."""
    return [int(e * epochs / reference_epochs + 0.5) for e in step_epochs]


def stepped_lr(lr: float, factors: Sequence[float], boundaries: Sequence[int], epoch: int) -> float:
    """lr times the factor of the last boundary reached by `epoch` (0-based); plain lr before the first."""
    factor = 1.0
    for f, b in zip(factors, boundaries):
        if epoch >= b:
            factor = f
    return lr * factor


def set_lr(optimizer: Any, lr: float) -> None:
    """Set every parameter group of a torch optimizer to `lr`."""
    for group in optimizer.param_groups:
        group["lr"] = lr
