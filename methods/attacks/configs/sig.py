"""The sig attack's config, declared as a method (its run: methods/attacks/sig.py)."""

from __future__ import annotations

from dataclasses import dataclass

from methods.attacks.configs.shared import (
    LABEL_MODES,
    MAX_TEST_STRENGTH,
    AttackConfig,
    clean_label_departures,
)
from methods.core.config import choice, ranged
from methods.core.method import declare_method


@declare_method("sig", kind="attack")
@dataclass
class SIGConfig(AttackConfig):
    label_mode: str = choice("cleanLabel", LABEL_MODES)
    amplitude: float = ranged(40.0, 0.0, 255.0, "D when poisoning training images")
    amplitude_test: float = ranged(60.0, 0.0, 255.0, "D on evaluation images")
    frequency: float = ranged(6.0, 0.0, 64.0)

    def departures_from_papers(self) -> list[str]:
        # Barni et al. and the D-BR code poison 10% of the target class, keep labels, and test at 60 against 40;
        # the tuning ranges reach half the class.
        departures = clean_label_departures(self)
        if self.amplitude_test > MAX_TEST_STRENGTH * self.amplitude:
            departures.append(
                f"test amplitude {self.amplitude_test:g} is more than {MAX_TEST_STRENGTH:g}x the "
                f"training amplitude {self.amplitude:g} (papers: 60 against 40)"
            )
        return departures
