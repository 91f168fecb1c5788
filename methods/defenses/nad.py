"""NAD: erase a backdoor by distilling a fine-tuned teacher's attention maps into the backdoored model.

Li, Lyu, Koren, Lyu, Li, Ma, "Neural Attention Distillation: Erasing Backdoor Triggers from Deep Neural Networks",
ICLR 2021 (docs/methods.md#nad). The teacher is the backdoored model fine-tuned with CE on the clean subset
(teacher_epochs at teacher_lr); the student, the backdoored model itself, then trains on the same clean images with
CE + beta1 * AT(g1) + beta2 * AT(g2) + beta3 * AT(g3) on the three stage outputs the model declares, the teacher
frozen in eval mode. SGD with Nesterov momentum 0.9, weight decay 1e-4, batch 64, 20 epochs at lr 0.1 that drops
to 0.01 after epoch 2, betas 500 / 1000 / 1000 and attention power 2, as in the official configuration.

Deviations from the official code: the clean subset is drawn with the recorded clean seed and the same indices
serve teacher and student (the official split is unseeded); the lr step epochs are scaled with `epochs` (given
for the 20-epoch schedule), so shortened or lengthened schedules keep the same shape; the last epoch's model is
kept. This module also holds what ARGD shares with NAD: the config base, the teacher stage and the student loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.core.config import listed, ranged
from methods.core.context import RunContext
from methods.core.method import register_method
from methods.core.training import derive_seed, make_generator, minibatches, sgd, to_float
from methods.defenses.attention import attention_map, weighted_at_loss
from methods.defenses.common import DefenseConfig, clean_subset, final_result
from methods.defenses.ft import Stage, clean_augment, finetune_stage, run_stages, scaled_steps, set_lr, stepped_lr


@dataclass
class DistillConfig(DefenseConfig):
    """Fields NAD and ARGD share. `lr_step_epochs` are given for the method's paper schedule length
    (REFERENCE_EPOCHS) and scaled to `epochs`; at each the lr becomes lr times the matching `lr_steps` factor."""

    REFERENCE_EPOCHS = 10

    clean_ratio: float = ranged(0.05, 1e-4, 1.0, "fraction of the training set available as clean data")
    epochs: int = ranged(10, 1, 10_000, "distillation epochs")
    lr: float = ranged(0.1, 0.0, 10.0, "initial distillation lr")
    lr_steps: list[float] = listed([0.1, 0.01], 0.0, 10.0, "lr factors from each step epoch on")
    lr_step_epochs: list[int] = listed([3, 6], 1, None, "step epochs of the paper schedule, scaled to epochs")
    batch_size: int = ranged(64, 2, 65_536)
    momentum: float = ranged(0.9, 0.0, 1.0)
    weight_decay: float = ranged(1e-4, 0.0, 1.0)
    nesterov: bool = True
    p: float = ranged(2.0, 0.5, 8.0, "attention-map power")
    cutout_length: int = ranged(3, 0, 64, "Cutout side (half-length floored: 3 cuts 2 x 2); 0 disables it")
    teacher_epochs: int = ranged(10, 1, 10_000, "CE training epochs of the teacher")

    def validate(self) -> None:
        if len(self.lr_steps) != len(self.lr_step_epochs):
            raise ValueError(f"lr_steps: {len(self.lr_steps)} factors for {len(self.lr_step_epochs)} lr_step_epochs; "
                             "give one factor per step epoch")
        if any(b <= a for a, b in zip(self.lr_step_epochs, self.lr_step_epochs[1:])):
            raise ValueError(f"lr_step_epochs: must be strictly increasing, got {self.lr_step_epochs}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov: needs momentum > 0")

    def student_lr(self, epoch: int) -> float:
        steps = scaled_steps(self.lr_step_epochs, self.REFERENCE_EPOCHS, self.epochs)
        return stepped_lr(self.lr, self.lr_steps, steps, epoch)


@dataclass
class NADConfig(DistillConfig):
    REFERENCE_EPOCHS = 20

    epochs: int = ranged(20, 1, 10_000, "distillation epochs")
    lr_steps: list[float] = listed([0.1], 0.0, 10.0, "lr factors from each step epoch on")
    lr_step_epochs: list[int] = listed([2], 1, None, "step epochs of the 20-epoch schedule, scaled to epochs")
    beta1: float = ranged(500.0, 0.0, None, "AT weight of the first stage output")
    beta2: float = ranged(1000.0, 0.0, None, "AT weight of the second stage output")
    beta3: float = ranged(1000.0, 0.0, None, "AT weight of the third stage output")
    teacher_lr: float = ranged(0.01, 0.0, 10.0, "lr of the teacher's fine-tuning")


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
LossFn = Callable[[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor | None],
                  dict[str, torch.Tensor]]


def distill_stage(ctx: RunContext, cfg: DistillConfig, student: nn.Module, teacher: nn.Module,
                  optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, info, g: torch.Generator,
                  loss_terms: LossFn, head: nn.Module | None = None) -> Stage:
    """The student stage: per batch, the frozen teacher's attention maps under no_grad, then the sum of the
    method's `loss_terms` on the student. Reports each term's epoch mean."""
    forward = ctx.wrap_model(StudentForward(student, head))
    augment = clean_augment(info, g, cfg.cutout_length)
    n = len(y)
    # BatchNorm (ARGD's heads) cannot normalise a one-sample batch on any rank, so such a remainder is dropped.
    drop_last = n > cfg.batch_size and 0 < (n % cfg.batch_size) < 2 * ctx.world_size

    def run_epoch(epoch: int) -> dict[str, torch.Tensor]:
        lr = cfg.student_lr(epoch)
        set_lr(optimizer, lr)
        forward.train()
        teacher.eval()
        totals: dict[str, torch.Tensor] = {}
        batches = 0
        for idx in minibatches(n, cfg.batch_size, g, x.device, drop_last=drop_last,
                               rank=ctx.rank, world_size=ctx.world_size):
            xb = augment(to_float(x[idx]))
            with torch.no_grad():
                teacher_maps = [attention_map(s, cfg.p) for s in teacher.forward_features(xb).stages]
            logits, student_maps, head_loss = forward(xb, teacher_maps, cfg.p)
            terms = loss_terms(logits, y[idx], student_maps, teacher_maps, head_loss)
            loss = sum(terms.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for k, v in {"train_loss": loss, **terms}.items():
                totals[k] = totals.get(k, 0.0) + v.detach()
            batches += 1
        return {**{k: v / max(batches, 1) for k, v in totals.items()}, "lr": torch.tensor(lr)}

    return Stage("distill", cfg.epochs, student, run_epoch)


def teacher_stage(ctx: RunContext, cfg: DistillConfig, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  info, lr_at: Callable[[int], float]) -> tuple[Stage, torch.optim.Optimizer, torch.Generator]:
    """The teacher of NAD and ARGD: CE on the clean subset for teacher_epochs, lr per epoch from `lr_at`."""
    optimizer = sgd(teacher.parameters(), lr_at(0), cfg.momentum, cfg.weight_decay, cfg.nesterov)
    g = make_generator(derive_seed(cfg.seed, "teacher"), ctx.device)
    stage = finetune_stage(ctx, "teacher", teacher, optimizer, x, y, info, g, cfg.teacher_epochs, cfg.batch_size,
                           cfg.cutout_length, lr_at)
    return stage, optimizer, g


@register_method("nad", kind="defense", config=NADConfig)
def run(ctx: RunContext, cfg: NADConfig):
    backdoor = ctx.backdoor().to(ctx.device)
    data = backdoor.data
    idx = clean_subset(backdoor, cfg.clean_ratio, cfg.clean_seed)
    x, y = data.x_train[idx], data.y_train[idx]
    student, teacher = backdoor.build_model(ctx.device), backdoor.build_model(ctx.device)
    first, teacher_opt, g_teacher = teacher_stage(ctx, cfg, teacher, x, y, data.info, lambda epoch: cfg.teacher_lr)
    optimizer = sgd(student.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay, cfg.nesterov)
    g = make_generator(derive_seed(cfg.seed, "train"), ctx.device)
    betas = (cfg.beta1, cfg.beta2, cfg.beta3)

    def loss_terms(logits, labels, student_maps, teacher_maps, _):
        return {"loss_ce": F.cross_entropy(logits, labels),
                "loss_at": weighted_at_loss(student_maps, teacher_maps, betas)}

    stage = distill_stage(ctx, cfg, student, teacher, optimizer, x, y, data.info, g, loss_terms)
    last = run_stages(ctx, backdoor, [first, stage], {"teacher": teacher, "student": student},
                      {"teacher": teacher_opt, "student": optimizer}, {"teacher": g_teacher, "train": g},
                      cfg.eval_batch_size)
    return final_result(ctx, student, backdoor, last, batch_size=cfg.eval_batch_size)
