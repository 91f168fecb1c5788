"""The asd defense's config, declared as a method (its run: methods/defenses/asd.py)."""

from __future__ import annotations

from dataclasses import dataclass

from methods.core.config import choice, ranged
from methods.core.method import declare_method
from methods.defenses.configs.shared import DefenseConfig

META_LAYERS = ("late", "classifier")


@declare_method("asd", kind="defense", splits_samples=True, from_scratch=True)
@dataclass
class ASDConfig(DefenseConfig):
    epochs: int = ranged(120, 1, 100_000, "total MixMatch epochs (stage boundaries scale with it)")
    iterations_per_epoch: int = ranged(1024, 1, 10_000_000, "MixMatch iterations per epoch")
    batch_size: int = ranged(64, 2, 65_536, "labeled batch = unlabeled batch")
    lr: float = ranged(2e-3, 1e-8, 1.0, "Adam learning rate of the MixMatch training")
    weight_decay: float = ranged(0.0, 0.0, 1.0)
    stage1_end: float = ranged(0.5, 0.0, 1.0, "fraction of epochs spent in stage 1 (class-aware split)")
    stage2_end: float = ranged(0.75, 0.0, 1.0, "fraction of epochs after which the meta split starts")
    seed_num: int = ranged(10, 1, 100_000, "trusted clean seed images per class")
    class_increment: int = ranged(10, 0, 1_000_000, "stage 1: low-loss images added per class every period")
    class_period: int = ranged(5, 1, 100_000, "stage 1: epochs between two increments")
    epsilon: float = ranged(0.5, 0.01, 0.99, "stages 2-3: fraction of all images in the clean pool")
    sce_alpha: float = ranged(0.1, 0.0, 100.0, "weight of CE in the split loss")
    sce_beta: float = ranged(1.0, 0.0, 100.0, "weight of reverse CE in the split loss")
    meta_lr: float = ranged(0.015, 1e-8, 10.0, "Adam lr of the meta split's virtual model")
    meta_epochs: int = ranged(1, 1, 1000, "supervised epochs of the virtual model")
    meta_batch_size: int = ranged(128, 1, 65_536)
    meta_layers: str = choice(
        "late", META_LAYERS, "layers the virtual model trains: the model's late modules or the classifier"
    )
    temperature: float = ranged(0.5, 0.01, 10.0, "MixMatch sharpening temperature T")
    mixup_alpha: float = ranged(0.75, 0.01, 100.0, "MixUp Beta(alpha, alpha)")
    lambda_u: float = ranged(15.0, 0.0, 10_000.0, "weight of the unlabeled loss after the ramp")
    rampup: float | None = ranged(None, 0.0, 100_000.0, "epochs of the linear lambda_u ramp (default: epochs)")
    record_with_aug: bool = True

    def validate(self) -> None:
        if self.stage2_end < self.stage1_end:
            raise ValueError(
                f"stage2_end: {self.stage2_end} must be >= stage1_end ({self.stage1_end}); both are fractions of epochs"
            )
        if self.sce_alpha + self.sce_beta <= 0:
            raise ValueError("sce_alpha, sce_beta: at least one must be > 0, or the split loss is constant")
