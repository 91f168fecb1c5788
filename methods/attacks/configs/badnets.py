"""The badnets attack's config, declared as a method (its run: methods/attacks/badnets.py)."""

from __future__ import annotations

from dataclasses import dataclass

from methods.attacks.configs.shared import AttackConfig, check_pattern_file
from methods.core.config import choice, ranged
from methods.core.method import declare_method


@declare_method("badnets", kind="attack")
@dataclass
class BadNetsConfig(AttackConfig):
    pattern: str = choice("grid", ("grid", "square", "four_corner", "file"))
    patch_file: str | None = None
    patch_size: int = ranged(3, 1, 64, "side of the `file` patch in pixels")

    def validate(self) -> None:
        super().validate()
        check_pattern_file(self.pattern, "patch_file", self.patch_file)
