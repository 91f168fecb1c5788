"""Fine-tuning (FT): retrain the backdoored model with cross-entropy on a small clean subset of the training data.

The plain baseline of the attention-distillation defenses and the teacher of both: NAD (Li, Lyu, Koren, Lyu, Li,
Ma, "Neural Attention Distillation: Erasing Backdoor Triggers from Deep Neural Networks", ICLR 2021) and ARGD
(Xia, Wang, Ding, Wei, Chen, "Eliminating Backdoor Triggers for Deep Neural Networks Using Attention Relation
Graph Distillation", IJCAI 2022) fine-tune the backdoored model on 5% clean training data with CE for 5-10
epochs (their READMEs; lr 0.01 as docs/methods.md#ft recommends), with the clean pipeline of their code:
random crop, flip where the dataset allows it, and Cutout (length 3, a 2 x 2 hole).

Deviations from the official code: the clean subset is drawn with the attack's recorded clean seed rather than an
unseeded random_split, so teacher and student (and every defense) see the same images; the crop padding and
flip follow the dataset (digits are padded by 2 and never flipped) instead of CIFAR's fixed 4 px and flip.

This module also holds what NAD and ARGD reuse: the clean-data augmentation, the stepped learning-rate schedule,
and `run_stages`, which runs consecutive training stages (teacher, then student) with continuous step
numbering, a report and a full-state checkpoint after every epoch, and resumption after any step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn

from methods.attacks.base import Backdoor
from methods.core.context import RunContext
from methods.core.method import register_method
from methods.core.training import derive_seed, full_state, make_generator, restore_full_state, sgd, train_epoch
from methods.data.augment import standard_augment
from methods.data.configs import DatasetInfo
from methods.defenses.attention import cutout
from methods.defenses.common import clean_subset, final_result, report_eval
from methods.defenses.configs import FTConfig


def clean_augment(info: DatasetInfo, g: torch.Generator, cutout_length: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The clean-data pipeline of NAD/ARGD: the dataset's standard crop/flip, then Cutout."""
    return lambda x: cutout(standard_augment(x, info, g), cutout_length, g)


def scaled_steps(step_epochs: Sequence[int], reference_epochs: int, epochs: int) -> list[int]:
    """Step epochs given for a `reference_epochs` schedule, moved proportionally onto one of `epochs`."""
    return [int(e * epochs / reference_epochs + 0.5) for e in step_epochs]


def stepped_lr(lr: float, factors: Sequence[float], boundaries: Sequence[int], epoch: int) -> float:
    """lr times the factor of the last boundary reached by `epoch` (0-based); plain lr before the first."""
    factor = 1.0
    for f, b in zip(factors, boundaries):
        if epoch >= b:
            factor = f
    return lr * factor


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@dataclass
class Stage:
    """`epochs` epochs of training; `run_epoch(epoch)` (0-based within the stage) trains one and returns its
    metrics as tensors (synchronised once, when reported); `model` is what the stage's reports evaluate."""

    name: str
    epochs: int
    model: nn.Module
    run_epoch: Callable[[int], dict[str, torch.Tensor]]


def run_stages(ctx: RunContext, backdoor: Backdoor, stages: Sequence[Stage], models: dict[str, nn.Module],
               optimizers: dict[str, torch.optim.Optimizer], generators: dict[str, torch.Generator],
               eval_batch_size: int) -> tuple[int, dict[str, float]]:
    """Run the stages one after another. Step s (from 1) is one epoch; after each the stage's model is evaluated
    and reported with its metrics and the stage index, and everything is checkpointed. A checkpoint in the
    context resumes after its step. Returns (step, metrics) of the last report, ({} if a resumed run had nothing
    left to train), for final_result."""
    state = ctx.load_state()
    start = restore_full_state(state, models, optimizers, {}, generators) if state is not None else 0
    last: tuple[int, dict[str, float]] = (start, {})
    step = 0
    for index, stage in enumerate(stages):
        for epoch in range(stage.epochs):
            step += 1
            if step <= start:
                continue
            ctx.progress(f"{stage.name} epoch {epoch + 1}/{stage.epochs} (step {step})")
            extra = {k: float(v) for k, v in stage.run_epoch(epoch).items()}
            last = (step, report_eval(ctx, stage.model, backdoor, step, {**extra, "stage": float(index)},
                                      batch_size=eval_batch_size))
            ctx.save_state(full_state(step, models, optimizers, {}, generators, extra={"stage": stage.name}))
    return last


def finetune_stage(ctx: RunContext, name: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                   x: torch.Tensor, y: torch.Tensor, info: DatasetInfo, g: torch.Generator, epochs: int,
                   batch_size: int, cutout_length: int, lr_at: Callable[[int], float]) -> Stage:
    """A CE fine-tuning stage on (x, y): FT itself, NAD's and ARGD's fine-tuned teacher, ARGD's scratch teacher."""
    wrapped = ctx.wrap_model(model)
    augment = clean_augment(info, g, cutout_length)

    def run_epoch(epoch: int) -> dict[str, torch.Tensor]:
        lr = lr_at(epoch)
        set_lr(optimizer, lr)
        loss = train_epoch(wrapped, optimizer, x, y, batch_size, g, augment, rank=ctx.rank, world_size=ctx.world_size)
        return {"train_loss": loss, "lr": torch.tensor(lr)}

    return Stage(name, epochs, model, run_epoch)


@register_method("ft")
def run(ctx: RunContext, cfg: FTConfig):
    backdoor = ctx.backdoor().to(ctx.device)
    data = backdoor.data
    idx = clean_subset(backdoor, cfg.clean_ratio, cfg.clean_seed)
    model = backdoor.build_model(ctx.device)
    optimizer = sgd(model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay, cfg.nesterov)
    g = make_generator(derive_seed(cfg.seed, "train"), ctx.device)
    stage = finetune_stage(ctx, "finetune", model, optimizer, data.x_train[idx], data.y_train[idx], data.info, g,
                           cfg.epochs, cfg.batch_size, cfg.cutout_length, lambda epoch: cfg.lr)
    last = run_stages(ctx, backdoor, [stage], {"model": model}, {"opt": optimizer}, {"train": g},
                      cfg.eval_batch_size)
    return final_result(ctx, model, backdoor, last, batch_size=cfg.eval_batch_size)
