"""The wanet attack's config, declared as a method (its run: methods/attacks/wanet.py)."""

from __future__ import annotations

from dataclasses import dataclass

from methods.attacks.configs.shared import (
    AttackConfig,
)
from methods.core.config import ranged
from methods.core.method import declare_method


@declare_method("wanet", kind="attack")
@dataclass
class WaNetConfig(AttackConfig):
    k: int = ranged(4, 2, 64, "control grid size")
    s: float = ranged(0.5, 0.0, 10.0, "warping strength")
    grid_rescale: float = ranged(1.0, 0.0, 2.0)
    cross_ratio: float = ranged(2.0, 0.0, 10.0, "noise-mode images per poisoned image")
    rotation_deg: float = ranged(10.0, 0.0, 180.0, "training rotation range in degrees; 0 turns rotation off")
