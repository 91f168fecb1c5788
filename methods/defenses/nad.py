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

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.core.context import RunContext
from methods.core.method import register_method
from methods.core.training import derive_seed, make_generator, minibatches, sgd, to_float
from methods.defenses.attention import attention_map, weighted_at_loss
from methods.defenses.common import clean_subset, final_result
from methods.defenses.configs import DistillConfig, NADConfig
from methods.defenses.ft import Stage, clean_augment, finetune_stage, run_stages, set_lr


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


@register_method("nad")
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
