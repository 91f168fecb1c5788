"""The aft defense's config, declared as a method (its run: methods/defenses/aft.py)."""

from __future__ import annotations

from dataclasses import dataclass

from methods.core.config import ranged
from methods.core.method import declare_method
from methods.defenses.configs.shared import AdversarialFinetuneConfig


@declare_method("aft", kind="defense")
@dataclass
class AFTConfig(AdversarialFinetuneConfig):
    clean_ratio: float = ranged(0.05, 0.0, 1.0, "clean extra set as a fraction of the training set")
    epochs: int = ranged(20, 1, 100_000, "fine-tuning epochs in total")
    adv_epochs: int | None = ranged(3, 0, None, "leading epochs trained on PGD examples (None: every epoch)")

    def validate(self) -> None:
        if self.clean_ratio <= 0:
            raise ValueError(f"clean_ratio: {self.clean_ratio} must be > 0 (AFT needs clean data)")
        if self.adv_epochs is not None and self.adv_epochs > self.epochs:
            raise ValueError(f"adv_epochs: {self.adv_epochs} exceeds epochs {self.epochs}; use None for all epochs")
