"""D-ST: SD's sample split, then secure training from scratch: a semi-supervised SupCon extractor and a linear
head trained with the mixed cross-entropy.

Chen, Wu, Wang, "Effective Backdoor Defense by Exploiting Sensitivity of Poisoned Samples", NeurIPS 2022
(docs/methods.md#d-st). Stage 1 trains a fresh model of the backdoored model's architecture, with an MLP
projection head on its penultimate feature, by supervised contrastive learning on two strong views of every
training image, where only anchors of the suspected-clean pool take same-label positives; every other anchor's only
positive is its own second view. Stage 2 freezes that encoder and trains its linear classifier on the clean and
poisoned pools with CE(clean) - lambda_p x CE(poisoned).

Deviations from the official code:
- the two views come from `strong_augment`, the dataset's contrastive recipe: SimCLR's for 3-channel images as in
  the code, and rotation / translation / brightness-contrast for 1-channel digits, where colour jitter means
  nothing and flips change the digit;
- during stage 1 (where the paper has no classifier) each epoch reports the model with a nearest-class-mean probe
  over the clean pool's features as its classifier, so every step carries meaningful val/test metrics;
- `st_positive_pool="clean"` restricts a clean anchor's same-label positives to clean-pool views; the code (and the
  default, "any") also pulls same-label uncertain and poisoned views towards it, which drags the uncertain pool's
  poisoned samples into the target class's cluster (docs/methods.md#d-st);
- the mixed CE of a batch without poisoned-pool members is the clean CE alone (the code's would be NaN);
- under DDP each rank contrasts only its share of the global batch;
- SD follows `sd` (see its deviations).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.core.context import RunContext
from methods.core.method import register_method
from methods.core.metrics import POOL_CLEAN, POOL_POISON
from methods.core.training import (
    derive_seed,
    full_state,
    make_generator,
    minibatches,
    predict_features,
    restore_full_state,
    to_float,
)
from methods.data.augment import strong_augment
from methods.defenses.common import final_result, report_eval
from methods.defenses.configs import DSTConfig
from methods.defenses.sd import pool_indices, run_sd
from methods.models.base import BackdoorModel, build_model


# ------------------------------------------------------------------------------------------------ loss pieces
def supcon_positive_mask(labels: torch.Tensor, clean: torch.Tensor, clean_positives_only: bool = False) -> torch.Tensor:
    """(2B, 2B) boolean positives for the views [view 1 of every sample; view 2 of every sample]: a clean-pool
    anchor's positives are all other views with its label (from any pool, or with `clean_positives_only` from the
    clean pool only), anyone else's only its own other view."""
    b = len(labels)
    labels2, clean2 = labels.repeat(2), clean.repeat(2)
    index = torch.arange(2 * b, device=labels.device)
    twin = torch.zeros(2 * b, 2 * b, dtype=torch.bool, device=labels.device)
    twin[index, (index + b) % (2 * b)] = True
    same_label = (labels2[:, None] == labels2[None, :]) & (index[:, None] != index[None, :])
    if clean_positives_only:
        same_label &= clean2[None, :]
    return torch.where(clean2[:, None], same_label, twin)


def supcon_loss(z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor, clean: torch.Tensor,
                temperature: float, base_temperature: float, clean_positives_only: bool = False) -> torch.Tensor:
    """SupCon (Khosla et al. 2020) on L2-normalised projections of two views with D-ST's positive mask:
    mean over anchors of -(T / T_base) x mean over positives of log softmax(sim / T) over all other views."""
    z = torch.cat([z1, z2])
    sim = z @ z.t() / temperature
    self_pair = torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_prob = sim - torch.logsumexp(sim.masked_fill(self_pair, float("-inf")), dim=1, keepdim=True)
    positives = supcon_positive_mask(labels, clean, clean_positives_only).to(z.dtype)
    mean_log_prob = (positives * log_prob.masked_fill(self_pair, 0.0)).sum(1) / positives.sum(1)
    return -(temperature / base_temperature) * mean_log_prob.mean()


def mixed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, poisoned: torch.Tensor,
                        lambda_p: float) -> torch.Tensor:
    """CE over the batch's clean-pool members minus lambda_p x CE over its poisoned-pool members; a side with
    no member contributes 0 (no NaN, no host sync)."""
    ce = F.cross_entropy(logits, labels, reduction="none")
    p = poisoned.to(ce.dtype)
    c = 1.0 - p
    return (ce * c).sum() / c.sum().clamp(min=1.0) - lambda_p * (ce * p).sum() / p.sum().clamp(min=1.0)


def supcon_lr(cfg: DSTConfig, epoch: int, batch: int, n_batches: int) -> float:
    """The code's schedule: cosine from st_lr to st_lr x st_lr_decay over the epochs (set per epoch, 1-based),
    preceded by a per-step linear warm-up from st_warmup_from to the cosine's value at the warm-up's end."""
    eta_min = cfg.st_lr * cfg.st_lr_decay

    def cosine(e: float) -> float:
        return eta_min + (cfg.st_lr - eta_min) * (1 + math.cos(math.pi * e / cfg.st_epochs)) / 2

    if epoch <= cfg.st_warmup_epochs:
        progress = (batch + (epoch - 1) * n_batches) / (cfg.st_warmup_epochs * n_batches)
        return cfg.st_warmup_from + progress * (cosine(cfg.st_warmup_epochs) - cfg.st_warmup_from)
    return cosine(epoch)


# ------------------------------------------------------------------------------------------------ the ST stage
class SupConNet(nn.Module):
    """Encoder (the model's penultimate feature) plus projection MLP; returns L2-normalised projections."""

    def __init__(self, model: BackdoorModel, projector: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.projector = projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.model.features(x)), dim=1)


@torch.no_grad()
def _nearest_mean_probe(model: BackdoorModel, x_uint8: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
    """Set the classifier to the nearest-class-mean rule over these images' features (a linear rule:
    argmax_k f.m_k - |m_k|^2 / 2); classes without images are never predicted."""
    features = predict_features(model, to_float(x_uint8), batch_size)
    k = model.classifier.out_features
    onehot = F.one_hot(y, k).to(features.dtype)
    counts = onehot.sum(0)
    means = (onehot.t() @ features) / counts.clamp(min=1).unsqueeze(1)
    bias = torch.where(counts > 0, -0.5 * means.square().sum(1), torch.full_like(counts, -1e9))
    model.classifier.weight.copy_(means)
    model.classifier.bias.copy_(bias)


def _fresh_head(head: nn.Linear, g: torch.Generator) -> None:
    """PyTorch's default Linear initialisation, drawn from an explicit generator."""
    bound = 1.0 / math.sqrt(head.in_features)
    with torch.no_grad():
        for p in (head.weight, head.bias):
            p.copy_((torch.rand(p.shape, generator=g, device=p.device) * 2 - 1) * bound)


@register_method("dst")
def run(ctx: RunContext, cfg: DSTConfig):
    backdoor = ctx.backdoor().to(ctx.device)
    data, device = backdoor.data, ctx.device
    state = ctx.load_state()
    sd = run_sd(ctx, cfg, backdoor, state)
    stage = state["extra"].get("stage") if state is not None else None

    torch.manual_seed(derive_seed(cfg.seed, "st_init"))
    model = build_model(backdoor.model_name, data.info).to(device)
    width = model.feature_dim
    projector = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True),
                              nn.Linear(width, cfg.st_proj_dim)).to(device)
    g = make_generator(derive_seed(cfg.seed, "st"), device)
    clean_pool = pool_indices(sd.pools, POOL_CLEAN)
    x_clean, y_clean = data.x_train[clean_pool], data.y_train[clean_pool]
    is_clean = sd.pools == POOL_CLEAN
    n = len(data.y_train)
    augment = lambda xb: strong_augment(xb, data.info, g)  # noqa: E731

    # Stage 1: SupCon. The classifier is not part of it (frozen, so DDP does not wait on its gradient).
    model.classifier.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad] + list(projector.parameters()),
                                lr=cfg.st_lr, momentum=cfg.momentum, weight_decay=cfg.st_weight_decay)
    models1, opts1, gens = {"st": model, "proj": projector}, {"st": optimizer}, {"st": g}
    done = 0
    if stage == "st_supcon":
        done = restore_full_state(state, models1, opts1, {}, gens) - sd.step
    if stage != "st_cls" and done < cfg.st_epochs:
        net = ctx.wrap_model(SupConNet(model, projector))
        n_batches = math.ceil(n / cfg.st_batch_size)
        for epoch in range(done + 1, cfg.st_epochs + 1):
            net.train()
            total = torch.zeros((), device=device)
            for batch, idx in enumerate(minibatches(n, cfg.st_batch_size, g, device, rank=ctx.rank,
                                                    world_size=ctx.world_size)):
                optimizer.param_groups[0]["lr"] = supcon_lr(cfg, epoch, batch, n_batches)
                x = to_float(data.x_train[idx])
                z = net(torch.cat([augment(x), augment(x)]))
                loss = supcon_loss(z[: len(idx)], z[len(idx) :], data.y_train[idx], is_clean[idx],
                                   cfg.st_supcon_temperature, cfg.st_base_temperature,
                                   cfg.st_positive_pool == "clean")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach()
            _nearest_mean_probe(model, x_clean, y_clean, cfg.eval_batch_size)
            step = sd.step + epoch
            report_eval(ctx, model, backdoor, step, {**sd.split, "st_supcon_loss": (total / n_batches).item()},
                        cfg.eval_batch_size)
            ctx.save_state(full_state(step, models1, opts1, {}, gens, extra={"stage": "st_supcon", **sd.extra()}))

    # Stage 2: a fresh linear head on the frozen encoder, mixed CE over the clean and poisoned pools.
    model.requires_grad_(False)
    head = model.classifier
    head.requires_grad_(True)
    _fresh_head(head, make_generator(derive_seed(cfg.seed, "st_head"), device))
    head_opt = torch.optim.SGD(head.parameters(), lr=cfg.st_cls_lr, momentum=cfg.momentum,
                               weight_decay=cfg.st_cls_weight_decay)
    head_sched = torch.optim.lr_scheduler.MultiStepLR(head_opt, milestones=[60, 75, 90], gamma=0.2)
    models2, opts2, scheds2 = {"st": model}, {"cls": head_opt}, {"cls": head_sched}
    done = 0
    if stage == "st_cls":
        done = restore_full_state(state, models2, opts2, scheds2, gens) - sd.step - cfg.st_epochs
    train_idx = pool_indices(sd.pools, POOL_CLEAN, POOL_POISON)
    x_train, y_train = data.x_train[train_idx], data.y_train[train_idx]
    poisoned = sd.pools[train_idx] == POOL_POISON
    wrapped_head = ctx.wrap_model(head)
    # a run resumed after its last epoch has reported that epoch already; its checkpoint carries the report
    last: tuple[int, dict[str, Any]] = (sd.step + cfg.st_epochs + done,
                                        state["extra"].get("metrics", {}) if stage == "st_cls" else {})
    for epoch in range(done + 1, cfg.st_cls_epochs + 1):
        model.eval()  # frozen encoder, BN statistics included
        head.train()
        total = torch.zeros((), device=device)
        steps = 0
        for idx in minibatches(len(train_idx), cfg.st_cls_batch_size, g, device, rank=ctx.rank,
                               world_size=ctx.world_size):
            with torch.no_grad():
                features = model.features(augment(to_float(x_train[idx])))
            loss = mixed_cross_entropy(wrapped_head(features), y_train[idx], poisoned[idx], cfg.st_lambda_p)
            head_opt.zero_grad(set_to_none=True)
            loss.backward()
            head_opt.step()
            total += loss.detach()
            steps += 1
        head_sched.step()
        step = sd.step + cfg.st_epochs + epoch
        metrics = report_eval(ctx, model, backdoor, step, {**sd.split, "st_cls_loss": (total / max(steps, 1)).item()},
                              cfg.eval_batch_size)
        last = (step, metrics)
        ctx.save_state(full_state(step, models2, opts2, scheds2, gens, extra={"stage": "st_cls", "metrics": metrics,
                                                                           **sd.extra()}))
    return final_result(ctx, model, backdoor, last, batch_size=cfg.eval_batch_size)
