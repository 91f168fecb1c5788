"""The blend attack's config, declared as a method (its run: methods/attacks/blend.py)."""

from __future__ import annotations

from dataclasses import dataclass

from methods.attacks.configs.shared import AttackConfig, check_pattern_file
from methods.core.config import choice, ranged
from methods.core.method import declare_method


@declare_method("blend", kind="attack")
@dataclass
class BlendConfig(AttackConfig):
    pattern: str = choice("random", ("random", "stripe", "noise", "file"))
    pattern_file: str | None = None
    alpha: float = ranged(0.2, 0.0, 1.0, "blend weight of the pattern in poisoned training images")
    alpha_test: float | None = ranged(None, 0.0, 1.0, "blend weight at evaluation (default: alpha)")

    def validate(self) -> None:
        super().validate()
        check_pattern_file(self.pattern, "pattern_file", self.pattern_file)
