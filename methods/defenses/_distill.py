"""The stages FT, NAD and ARGD are built from: CE fine-tuning on clean data with the clean pipeline of the NAD/ARGD
code (FT itself and the teachers), and attention distillation into the student."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from methods.attacks.base import Backdoor
from methods.core.context import RunContext
from methods.core.engine import Engine, Stage
from methods.core.schedules import set_lr
from methods.core.training import derive_seed, make_generator, minibatches, sgd, to_float
from methods.data.augment import standard_augment
from methods.data.configs import DatasetInfo
from methods.defenses.attention import attention_map, cutout
from methods.defenses.common import evaluation
from methods.defenses.configs import DistillConfig


def clean_augment(info: DatasetInfo, cutout_length: int) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """The clean-data pipeline of NAD/ARGD: the dataset's standard crop/flip, then Cutout."""
    return lambda x, g: cutout(standard_augment(x, info, g), cutout_length, g)


def finetune_stage(engine: Engine, backdoor: Backdoor, name: str, index: int, model: nn.Module,
                   optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, g: torch.Generator,
                   epochs: int, batch_size: int, cutout_length: int, lr_at: Callable[[int], float],
                   eval_batch_size: int) -> Stage:
    """CE fine-tuning of `model` on (x, y) with the clean pipeline, one epoch a step, reported with the stage's
    `index`: FT itself, NAD's and ARGD's fine-tuned teacher, ARGD's scratch teacher."""
    return engine.epochs(name, epochs, model, x, y, batch_size, optimizer=optimizer, generator=g, lr_at=lr_at,
                         augment=clean_augment(backdoor.data.info, cutout_length),
                         evaluate=evaluation(model, backdoor, eval_batch_size), extra={"stage": float(index)})


def teacher_stage(engine: Engine, cfg: DistillConfig, backdoor: Backdoor, teacher: nn.Module, x: torch.Tensor,
                  y: torch.Tensor, lr_at: Callable[[int], float]) -> Stage:
    """The teacher of NAD and ARGD (stage 0): CE on the clean subset for teacher_epochs, lr per epoch from `lr_at`."""
    optimizer = sgd(teacher.parameters(), lr_at(0), cfg.momentum, cfg.weight_decay, cfg.nesterov)
    g = make_generator(derive_seed(cfg.seed, "teacher"), engine.ctx.device)
    return finetune_stage(engine, backdoor, "teacher", 0, teacher, optimizer, x, y, g, cfg.teacher_epochs,
                          cfg.batch_size, cfg.cutout_length, lr_at, cfg.eval_batch_size)


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


def distill_stage(ctx: RunContext, cfg: DistillConfig, backdoor: Backdoor, student: nn.Module, teacher: nn.Module,
                  optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, g: torch.Generator,
                  loss_terms: LossFn, head: nn.Module | None = None) -> Stage:
    """The student stage (stage 1): per batch, the frozen teacher's attention maps under no_grad, then the sum of
    the method's `loss_terms` on the student. Reports each term's epoch mean."""
    forward = ctx.wrap_model(StudentForward(student, head))
    augment = clean_augment(backdoor.data.info, cfg.cutout_length)
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
            xb = augment(to_float(x[idx]), g)
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
        return {**{k: v / max(batches, 1) for k, v in totals.items()}, "lr": torch.tensor(lr), "stage": 1.0}

    return Stage("distill", cfg.epochs, run_epoch, evaluation(student, backdoor, cfg.eval_batch_size))
