"""The trojan attack's config, declared as a method (its run: methods/attacks/trojan.py)."""

from __future__ import annotations

from dataclasses import dataclass

from methods.attacks.configs.shared import (
    AttackConfig,
)
from methods.core.method import declare_method


@declare_method("trojan", kind="attack")
@dataclass
class TrojanConfig(AttackConfig):
    pass
