"""The stages FT, NAD and ARGD are built from: CE fine-tuning on clean data with the clean pipeline of the NAD/ARGD
code (FT itself and the teachers), and attention distillation into the student."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from methods.core.engine import Stage
from methods.core.schedules import set_lr
from methods.core.training import descend, sgd, to_float
from methods.data.augment import standard_augment
from methods.data.configs import DatasetInfo
from methods.defenses.configs.shared import DistillConfig
from methods.defenses.shared.attention import attention_map, cutout
from methods.defenses.shared.common import DefenseRun


def clean_augment(info: DatasetInfo, cutout_length: int) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """The clean-data pipeline of NAD/ARGD: the dataset's standard crop/flip, then Cutout."""
    return lambda x, g: cutout(standard_augment(x, info, g), cutout_length, g)


def finetune_stage(
    defense: DefenseRun,
    name: str,
    index: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    g: torch.Generator,
    epochs: int,
    batch_size: int,
    lr_at: Callable[[int], float],
) -> Stage:
    """CE fine-tuning of `model` on (x, y) with the clean pipeline (the run's Cutout length), one epoch a step,
    reported with the stage's `index`: FT itself, NAD's and ARGD's fine-tuned teacher, ARGD's scratch teacher."""
    return defense.engine.epochs(
        name,
        epochs,
        model,
        x,
        y,
        batch_size,
        optimizer=optimizer,
        generator=g,
        lr_at=lr_at,
        augment=clean_augment(defense.data.info, defense.cfg.cutout_length),
        evaluate=defense.evaluation(model),
        extra={"stage": float(index)},
    )


def teacher_stage(
    defense: DefenseRun, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, lr_at: Callable[[int], float]
) -> Stage:
    """The teacher of NAD and ARGD (stage 0): CE on the clean subset for teacher_epochs, lr per epoch from `lr_at`."""
    cfg: DistillConfig = defense.cfg
    optimizer = sgd(teacher.parameters(), lr_at(0), cfg.momentum, cfg.weight_decay, cfg.nesterov)
    return finetune_stage(
        defense,
        "teacher",
        0,
        teacher,
        optimizer,
        x,
        y,
        defense.generator("teacher"),
        cfg.teacher_epochs,
        cfg.batch_size,
        lr_at,
    )


class StudentForward(nn.Module):
    """What a distributed run wraps: the student together with any trainable loss head, so one forward yields the
    logits, the student's attention maps and the head's loss, and DDP synchronises the gradients of both."""

    def __init__(self, model: nn.Module, head: nn.Module | None = None) -> None:
        super().__init__()
        self.model, self.head = model, head

    def forward(self, x: torch.Tensor, teacher_maps: list[torch.Tensor], p: float):
        features = self.model.forward_features(x)
        maps = [attention_map(s, p) for s in features.stages]
        head_loss = self.head(maps, teacher_maps) if self.head is not None else None
        return features.logits, maps, head_loss


# (logits, labels, student maps, teacher maps, head loss or None) -> named, already-weighted terms, CE included
LossFn = Callable[
    [torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor | None], dict[str, torch.Tensor]
]


def distill_stage(
    defense: DefenseRun,
    student: nn.Module,
    teacher: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    g: torch.Generator,
    loss_terms: LossFn,
    head: nn.Module | None = None,
) -> Stage:
    """The student stage (stage 1): per batch, the frozen teacher's attention maps under no_grad, then the sum of
    the method's `loss_terms` on the student. Reports each term's epoch mean."""
    cfg: DistillConfig = defense.cfg
    forward = defense.ctx.wrap_model(StudentForward(student, head))
    augment = clean_augment(defense.data.info, cfg.cutout_length)
    n = len(y)
    # BatchNorm (ARGD's heads) cannot normalise a one-sample batch on any rank, so such a remainder is dropped.
    drop_last = n > cfg.batch_size and 0 < (n % cfg.batch_size) < 2 * defense.ctx.world_size

    def run_epoch(epoch: int) -> dict[str, torch.Tensor]:
        lr = cfg.student_lr(epoch)
        set_lr(optimizer, lr)
        forward.train()
        teacher.eval()

        def batch_loss(idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            xb = augment(to_float(x[idx]), g)
            with torch.no_grad():
                teacher_maps = [attention_map(s, cfg.p) for s in teacher.forward_features(xb).stages]
            logits, student_maps, head_loss = forward(xb, teacher_maps, cfg.p)
            terms = loss_terms(logits, y[idx], student_maps, teacher_maps, head_loss)
            return sum(terms.values()), terms

        means = descend(optimizer, defense.batches(n, cfg.batch_size, g, drop_last=drop_last), batch_loss)
        return {**means, "lr": torch.tensor(lr), "stage": 1.0}

    return Stage("distill", cfg.epochs, run_epoch, defense.evaluation(student))
