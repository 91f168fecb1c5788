"""ASD: MixMatch training from scratch on a poisoned set re-split every epoch into labeled clean / unlabeled pools.

The clean pool is chosen by class-aware low loss, then global low loss, then the meta split (smallest loss drop
after a virtual supervised epoch); the rest of the poisoned set is used without labels.

Gao, Bai, Gu, Yang, Xia, "Backdoor Defense via Adaptively Splitting Poisoned Dataset", CVPR 2023, pp. 4005-4014;
description in docs/methods.md#asd. Follows the official code (KuofengGao/ASD):

- The clean seeds (`seed_num` genuinely clean images per class) are drawn using the ground-truth poison flags,
  as the official code does to simulate a defender's tiny trusted set. They are drawn with the recorded clean
  seed (the attack's `clean_seed`, or `clean_seed` of this config), so every defense shares the same draw. This is
  the only use of the flags that changes what the defense does; everywhere else they only feed the metrics.
- The split loss is the symmetric cross-entropy (sce_alpha * CE + sce_beta * RCE), recorded in eval mode on
  augmented images by default (`record_with_aug`, the official quirk) over the whole poisoned set.
- Seeds are forced into the clean pool only in stage 1; the meta split's virtual copy trains its late layers
  (`model.late_modules`, or only the classifier with `meta_layers: classifier`) with plain CE on the full
  poisoned set, in train mode, then is discarded.

Deviations, all for reasons of scale or bookkeeping:
- Stage boundaries are fractions of `epochs` (0.5 and 0.75 = the code's 60 and 90 of 120), so shortened
  schedules keep the three stages; the lambda_u ramp lasts `rampup` epochs, default the whole run, as in the code.
- The labeled and unlabeled batches come from streams of fresh permutations of each pool, drawn once per epoch:
  a batch may straddle two passes instead of dropping the last partial batch, so pools smaller than one batch
  (few seeds on a small dataset) still train.
- MixUp coefficients come from a generator-driven Beta sampler (see methods.defenses.shared.mixmatch), so a resumed run
  repeats them.
- The final per-sample scores and pools handed over for scores.parquet are those of the last epoch's split (the
  one the final model was trained with): the SCE loss in stages 1-2, the loss drop of the meta split in stage 3,
  both higher = more suspicious. The latest model is returned (a fix docs/methods.md#asd recommends), not the
  best-test-ACC one.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.attacks.base import Backdoor
from methods.core.context import RunContext
from methods.core.engine import Stage
from methods.core.method import register_method
from methods.core.metrics import POOL_CLEAN, POOL_POISON, split_metrics
from methods.core.training import derive_seed, descend, to_float, train_epoch
from methods.data.augment import standard_augment
from methods.data.configs import DatasetInfo
from methods.defenses.configs.asd import ASDConfig
from methods.defenses.shared.common import DefenseRun, hand_off_scores
from methods.defenses.shared.mixmatch import (
    interleave,
    mixup,
    mixup_lambdas,
    ramp_weight,
    sharpen,
    soft_cross_entropy,
    squared_error,
    uninterleave,
)
from methods.models.base import BackdoorModel, build_model


def stage_of(epoch: int, cfg: ASDConfig) -> int:
    """Stage (1, 2 or 3) of a 0-based epoch."""
    if epoch < round(cfg.stage1_end * cfg.epochs):
        return 1
    if epoch < round(cfg.stage2_end * cfg.epochs):
        return 2
    return 3


def sce_loss(logits: torch.Tensor, y: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Per-sample symmetric cross-entropy alpha * CE + beta * RCE, RCE = -sum_k p_k log q_k with p clamped to
    [1e-7, 1] and the one-hot q to [1e-4, 1] (so RCE = -ln(1e-4) * (1 - p_y) up to the clamp)."""
    ce = F.cross_entropy(logits, y, reduction="none")
    p = torch.softmax(logits, dim=1).clamp(1e-7, 1.0)
    q = F.one_hot(y, logits.shape[1]).float().clamp(1e-4, 1.0)
    rce = -(p * torch.log(q)).sum(dim=1)
    return alpha * ce + beta * rce


@torch.no_grad()
def record_split_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: ASDConfig, info: DatasetInfo, g: torch.Generator
) -> torch.Tensor:
    """The split loss of every training image, eval mode, fixed order (augmented views if record_with_aug)."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(y), cfg.eval_batch_size):
        xb = to_float(x[start : start + cfg.eval_batch_size])
        if cfg.record_with_aug:
            xb = standard_augment(xb, info, g)
        out.append(sce_loss(model(xb), y[start : start + cfg.eval_batch_size], cfg.sce_alpha, cfg.sce_beta))
    model.train(was_training)
    return torch.cat(out)


def clean_seed_indices(backdoor: Backdoor, seed_num: int, clean_seed: int) -> torch.Tensor:
    """`seed_num` genuinely clean images per class, chosen with the ground-truth flags (the official code's
    simulated trusted set) and the clean seed; a class with fewer clean images gives all it has."""
    data = backdoor.data
    y, flags = data.y_train.cpu(), data.poison_flags.cpu()
    g = torch.Generator().manual_seed(int(clean_seed))
    picked = []
    for k in range(data.num_classes):
        candidates = torch.nonzero((y == k) & ~flags).flatten()
        picked.append(candidates[torch.randperm(len(candidates), generator=g)[:seed_num]])
    return torch.cat(picked).sort().values.to(data.y_train.device)


def class_aware_pool(
    loss: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor, per_class: int, num_classes: int
) -> torch.Tensor:
    """Stage 1: the seeds plus, per labeled class, the `per_class` non-seed images of lowest loss (bool mask)."""
    clean = torch.zeros_like(y, dtype=torch.bool)
    clean[seeds] = True
    if per_class > 0:
        order = torch.argsort(loss, stable=True)
        eligible = ~clean[order]
        for k in range(num_classes):
            clean[order[eligible & (y[order] == k)][:per_class]] = True
    return clean


def lowest_fraction_pool(score: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Stages 2-3: the fraction epsilon of all images with the lowest score (bool mask)."""
    clean = torch.zeros_like(score, dtype=torch.bool)
    clean[torch.argsort(score, stable=True)[: int(epsilon * len(score))]] = True
    return clean


def meta_loss_drop(
    model: BackdoorModel,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_before: torch.Tensor,
    cfg: ASDConfig,
    info: DatasetInfo,
    g_meta: torch.Generator,
    g_record: torch.Generator,
) -> torch.Tensor:
    """Stage 3: how much each image's split loss drops after a virtual copy's late layers take `meta_epochs`
    supervised CE epochs on the full poisoned set. Poisoned images, easy to fit, drop most."""
    virtual = copy.deepcopy(model)
    params = list(virtual.late_parameters() if cfg.meta_layers == "late" else virtual.classifier.parameters())
    trainable = {id(p) for p in params}
    for p in virtual.parameters():
        p.requires_grad_(id(p) in trainable)
    optimizer = torch.optim.Adam(params, lr=cfg.meta_lr)
    for _ in range(cfg.meta_epochs):
        train_epoch(
            virtual, optimizer, x, y, cfg.meta_batch_size, g_meta, augment=lambda xb: standard_augment(xb, info, g_meta)
        )
    return loss_before - record_split_loss(virtual, x, y, cfg, info, g_record)


def index_stream(pool: torch.Tensor, count: int, g: torch.Generator) -> torch.Tensor:
    """`count` indices from successive random permutations of `pool` (cycles like a re-shuffling loader)."""
    passes = math.ceil(count / len(pool))
    return torch.cat([pool[torch.randperm(len(pool), generator=g, device=pool.device)] for _ in range(passes)])[:count]


def mixmatch_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    clean_idx: torch.Tensor,
    polluted_idx: torch.Tensor,
    epoch: int,
    cfg: ASDConfig,
    info: DatasetInfo,
    g: torch.Generator,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, torch.Tensor]:
    """One epoch of MixMatch: the clean pool labeled, the polluted pool unlabeled. Returns mean losses as tensors."""
    iters, bs = cfg.iterations_per_epoch, cfg.batch_size
    num_classes = info.num_classes
    rampup = cfg.epochs if cfg.rampup is None else cfg.rampup
    labeled = index_stream(clean_idx, iters * bs, g)
    unlabeled = index_stream(polluted_idx, iters * bs, g) if len(polluted_idx) else None
    lambdas = mixup_lambdas(cfg.mixup_alpha, iters, g)
    model.train()

    def batch_loss(it: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        li = labeled[it * bs : (it + 1) * bs][rank::world_size]
        x_l = standard_augment(to_float(x[li]), info, g)
        inputs, targets = [x_l], [F.one_hot(y[li], num_classes).float()]
        if unlabeled is not None:
            xu = to_float(x[unlabeled[it * bs : (it + 1) * bs][rank::world_size]])
            views = [standard_augment(xu, info, g) for _ in range(2)]
            with torch.no_grad():
                guess = sharpen(sum(torch.softmax(model(v), dim=1) for v in views) / len(views), cfg.temperature)
            inputs += views
            targets += [guess, guess]
        mixed_x, mixed_t = mixup(torch.cat(inputs), torch.cat(targets), lambdas[it], g)
        n_l = len(li)
        logits = uninterleave([model(chunk) for chunk in interleave(list(mixed_x.split(n_l)))])
        lx = soft_cross_entropy(logits[0], mixed_t[:n_l])
        if unlabeled is not None:
            lu = squared_error(torch.cat(logits[1:]), mixed_t[n_l:])
        else:
            lu = torch.zeros((), device=x.device)
        return lx + ramp_weight(cfg.lambda_u, epoch + it / iters, rampup) * lu, {"train_lx": lx, "train_lu": lu}

    return descend(optimizer, range(iters), batch_loss)


@register_method("asd")
def run(ctx: RunContext, cfg: ASDConfig):
    defense = DefenseRun(ctx, cfg)
    backdoor, data, info = defense.backdoor, defense.data, defense.data.info
    x, y, flags = data.x_train, data.y_train, data.poison_flags
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "asd-init"))
        model = build_model(backdoor.model_name, info).to(ctx.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gens = {name: defense.generator(f"asd-{name}") for name in ("train", "record", "meta")}
    seeds = clean_seed_indices(
        backdoor, cfg.seed_num, backdoor.seeds["clean_seed"] if cfg.clean_seed is None else cfg.clean_seed
    )

    engine = defense.engine
    engine.track({"model": model}, {"opt": optimizer}, generators=gens)
    # the last split: what the final model was trained with, handed over as the run's scores
    kept = engine.keep(
        series={"epoch": [], "clean_pool_size": [], "clean_pool_poisoned": [], "stage": []}, pools=None, scores=None
    )
    wrapped = ctx.wrap_model(model)

    def run_epoch(epoch: int) -> dict[str, torch.Tensor | float]:
        stage = stage_of(epoch, cfg)
        loss = record_split_loss(model, x, y, cfg, info, gens["record"])
        if stage == 1:
            per_class = cfg.class_increment * (epoch // cfg.class_period)
            clean, kept.scores = class_aware_pool(loss, y, seeds, per_class, info.num_classes), loss
        elif stage == 2:
            clean, kept.scores = lowest_fraction_pool(loss, cfg.epsilon), loss
        else:
            kept.scores = meta_loss_drop(model, x, y, loss, cfg, info, gens["meta"], gens["record"])
            clean = lowest_fraction_pool(kept.scores, cfg.epsilon)
        kept.pools = torch.where(clean, POOL_CLEAN, POOL_POISON)
        clean_idx, polluted_idx = torch.nonzero(clean).flatten(), torch.nonzero(~clean).flatten()
        losses = mixmatch_epoch(
            wrapped, optimizer, x, y, clean_idx, polluted_idx, epoch, cfg, info, gens["train"], ctx.rank, ctx.world_size
        )
        series = kept.series
        series["epoch"].append(epoch + 1)
        series["clean_pool_size"].append(int(clean_idx.numel()))
        series["clean_pool_poisoned"].append(int(flags[clean_idx].sum().item()))
        series["stage"].append(stage)
        ctx.hand_off_series("asd_pools", series)
        ctx.progress(
            f"asd epoch {epoch + 1}/{cfg.epochs} stage {stage}: clean pool {len(clean_idx)} "
            f"({series['clean_pool_poisoned'][-1]} poisoned)"
        )
        return {**split_metrics(kept.pools, flags, kept.scores), **losses, "asd_stage": float(stage)}

    last = engine.run([Stage("mixmatch", cfg.epochs, run_epoch, defense.evaluation(model))])
    ctx.hand_off_series("asd_pools", kept.series)
    final_split = hand_off_scores(ctx, backdoor, kept.scores, kept.pools)
    return defense.finish(model, last, final_split)
