"""The blend attack's config, declared as a method (its run: methods/attacks/blend.py)."""

from __future__ import annotations

from dataclasses import dataclass

from methods.attacks.configs.shared import (
    AttackConfig,
)
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
        if self.pattern == "file" and not self.pattern_file:
            raise ValueError("pattern_file: required when pattern is 'file'")
        if self.pattern_file and self.pattern != "file":  # any other pattern never reads it: the file would be ignored
            raise ValueError(f"pattern_file: read only by pattern 'file', not {self.pattern!r}; set pattern=file too")
