"""The badnets attack's config, declared as a method (its run: methods/attacks/badnets.py)."""

from __future__ import annotations

from dataclasses import dataclass

from methods.attacks.configs.shared import (
    AttackConfig,
)
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
        if self.pattern == "file" and not self.patch_file:
            raise ValueError("patch_file: required when pattern is 'file'")
        if self.patch_file and self.pattern != "file":  # any other pattern never reads it: the file would be ignored
            raise ValueError(f"patch_file: read only by pattern 'file', not {self.pattern!r}; set pattern=file too")
