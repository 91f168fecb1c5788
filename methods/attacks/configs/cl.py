"""The cl attack's config, declared as a method (its run: methods/attacks/cl.py)."""

from __future__ import annotations

from dataclasses import dataclass

from methods.attacks.configs.shared import (
    LABEL_MODES,
    MAX_CL_PGD_EPS,
    MAX_TEST_STRENGTH,
    AttackConfig,
    clean_label_departures,
)
from methods.core.config import choice, ranged
from methods.core.method import declare_method


@declare_method("cl", kind="attack")
@dataclass
class CLConfig(AttackConfig):
    label_mode: str = choice("cleanLabel", LABEL_MODES)
    pgd_eps: float = ranged(8 / 255, 0.0, 1.0)
    pgd_step_size: float = ranged(2 / 255, 0.0, 1.0)
    pgd_steps: int = ranged(4, 0, 1000)
    clean_epochs: int | None = ranged(None, 1, 10_000, "epochs of the clean model (default: epochs)")
    trigger_amplitude: float = ranged(
        1.0,
        0.0,
        1.0,
        "share of the trigger's contrast stamped on poisoned training images; evaluation always stamps the full "
        "trigger (Turner et al.'s reduced-amplitude variant, BackdoorBench's reduced_amplitude)",
    )

    def departures_from_papers(self) -> list[str]:
        # Turner et al. and the D-BR code: 10% of the target class, PGD 8/255 (16/255 in the ablations), the full
        # trigger; the reduced-amplitude variant is a stronger test trigger than the training one.
        departures = clean_label_departures(self)
        if 255 * self.pgd_eps > 255 * MAX_CL_PGD_EPS + 1e-3:  # YAML files write 16/255 to a few digits
            departures.append(f"PGD radius {255 * self.pgd_eps:.0f}/255 is above the papers' 16/255")
        if self.trigger_amplitude * MAX_TEST_STRENGTH < 1.0:
            departures.append(
                f"training triggers at {self.trigger_amplitude:g} of the test trigger's contrast: "
                f"the test trigger is more than {MAX_TEST_STRENGTH:g}x stronger"
            )
        return departures

    def validate(self) -> None:
        super().validate()
        if self.label_mode != "cleanLabel":
            raise ValueError("label_mode: CL is a clean-label attack; only 'cleanLabel' is allowed")
