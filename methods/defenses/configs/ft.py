"""The ft defense's config, declared as a method (its run: methods/defenses/ft.py)."""

from __future__ import annotations

from dataclasses import dataclass

from methods.core.config import ranged
from methods.core.method import declare_method
from methods.defenses.configs.shared import DefenseConfig


@declare_method("ft", kind="defense")
@dataclass
class FTConfig(DefenseConfig):
    clean_ratio: float = ranged(0.05, 1e-4, 1.0, "fraction of the training set available as clean data")
    epochs: int = ranged(10, 1, 10_000)
    lr: float = ranged(0.01, 0.0, 10.0)
    batch_size: int = ranged(64, 1, 65_536)
    momentum: float = ranged(0.9, 0.0, 1.0)
    weight_decay: float = ranged(1e-4, 0.0, 1.0)
    nesterov: bool = True
    cutout_length: int = ranged(3, 0, 64, "Cutout side (half-length floored: 3 cuts 2 x 2); 0 disables it")

    def validate(self) -> None:
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov: needs momentum > 0")
