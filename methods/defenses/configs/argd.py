"""The argd defense's config, declared as a method (its run: methods/defenses/argd.py)."""

from __future__ import annotations

from dataclasses import dataclass

from methods.core.config import choice, listed, ranged
from methods.core.method import declare_method
from methods.core.schedules import scaled_steps, stepped_lr
from methods.defenses.configs.shared import DistillConfig

TEACHER_MODES = ("finetune_student", "scratch_wrn40_2")


# The released WRN-40-2 teacher recipe: 199 epochs, lr x0.1 at epoch 30 and x0.01 at epoch 60.
SCRATCH_REFERENCE_EPOCHS, SCRATCH_STEP_EPOCHS, SCRATCH_STEPS = 199, (30, 60), (0.1, 0.01)


@declare_method("argd", kind="defense")
@dataclass
class ARGDConfig(DistillConfig):
    REFERENCE_EPOCHS = 10

    vertex_weights: list[float] = listed([2000.0, 5000.0, 2000.0], 0.0, None, "AT weight of each stage's vertex")
    w_vert: float = ranged(1.0, 0.0, None, "weight of the vertex loss")
    w_edge: float = ranged(1.0, 0.0, None, "weight of the edge loss")
    w_trans: float = ranged(1.0, 0.0, None, "weight of the cross-layer transfer loss")
    qk_dim: int = ranged(128, 1, 4096, "query/key width of the transfer heads")
    trans_head_trainable: bool = False
    teacher_mode: str = choice("finetune_student", TEACHER_MODES)
    teacher_lr: float | None = ranged(None, 0.0, 10.0, "teacher lr (default 0.01 fine-tuning, 0.1 from scratch)")

    def validate(self) -> None:
        super().validate()
        if len(self.vertex_weights) != 3:
            raise ValueError(f"vertex_weights: one weight per stage output (3), got {len(self.vertex_weights)}")

    def teacher_lr_at(self, epoch: int) -> float:
        if self.teacher_mode == "finetune_student":
            return 0.01 if self.teacher_lr is None else self.teacher_lr
        lr = 0.1 if self.teacher_lr is None else self.teacher_lr
        steps = scaled_steps(SCRATCH_STEP_EPOCHS, SCRATCH_REFERENCE_EPOCHS, self.teacher_epochs)
        return stepped_lr(lr, SCRATCH_STEPS, steps, epoch)
