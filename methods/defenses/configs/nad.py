"""The nad defense's config, declared as a method (its run: methods/defenses/nad.py)."""

from __future__ import annotations

from dataclasses import dataclass

from methods.core.config import listed, ranged
from methods.core.method import declare_method
from methods.defenses.configs.shared import DistillConfig


@declare_method("nad", kind="defense")
@dataclass
class NADConfig(DistillConfig):
    REFERENCE_EPOCHS = 20

    epochs: int = ranged(20, 1, 10_000, "distillation epochs")
    lr_steps: list[float] = listed([0.1], 0.0, 10.0, "lr factors from each step epoch on")
    lr_step_epochs: list[int] = listed([2], 1, None, "step epochs of the 20-epoch schedule, scaled to epochs")
    beta1: float = ranged(500.0, 0.0, None, "AT weight of the first stage output")
    beta2: float = ranged(1000.0, 0.0, None, "AT weight of the second stage output")
    beta3: float = ranged(1000.0, 0.0, None, "AT weight of the third stage output")
    teacher_lr: float = ranged(0.01, 0.0, 10.0, "lr of the teacher's fine-tuning")
