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
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.core.context import RunContext
from methods.core.engine import Stage
from methods.core.method import register_method
from methods.core.metrics import POOL_CLEAN, POOL_POISON
from methods.core.schedules import set_lr
from methods.core.training import derive_seed, descend, predict_features, to_float
from methods.data.augment import strong_augment
from methods.defenses.configs.dst import DSTConfig
from methods.defenses.sd import pool_indices, sd_stages
from methods.defenses.shared.common import DefenseRun
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


def supcon_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    labels: torch.Tensor,
    clean: torch.Tensor,
    temperature: float,
    base_temperature: float,
    clean_positives_only: bool = False,
) -> torch.Tensor:
    """SupCon (Khosla et al. 2020) on L2-normalised projections of two views with D-ST's positive mask:
    mean over anchors of -(T / T_base) x mean over positives of log softmax(sim / T) over all other views."""
    z = torch.cat([z1, z2])
    sim = z @ z.t() / temperature
    self_pair = torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_prob = sim - torch.logsumexp(sim.masked_fill(self_pair, float("-inf")), dim=1, keepdim=True)
    positives = supcon_positive_mask(labels, clean, clean_positives_only).to(z.dtype)
    mean_log_prob = (positives * log_prob.masked_fill(self_pair, 0.0)).sum(1) / positives.sum(1)
    return -(temperature / base_temperature) * mean_log_prob.mean()


def mixed_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, poisoned: torch.Tensor, lambda_p: float
) -> torch.Tensor:
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
    defense = DefenseRun(ctx, cfg)
    backdoor, data, device, engine = defense.backdoor, defense.data, ctx.device, defense.engine
    sd_run, _, sd_split = sd_stages(defense)
    n = len(data.y_train)
    st = SimpleNamespace()  # what the two stages build when they begin

    def begin_supcon() -> None:
        torch.manual_seed(derive_seed(cfg.seed, "st_init"))
        st.model = model = build_model(backdoor.model_name, data.info).to(device)
        width = model.feature_dim
        st.projector = nn.Sequential(
            nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, cfg.st_proj_dim)
        ).to(device)
        st.g = defense.generator("st")
        clean_pool = pool_indices(sd_split.pools, POOL_CLEAN)
        st.x_clean, st.y_clean = data.x_train[clean_pool], data.y_train[clean_pool]
        st.is_clean = sd_split.pools == POOL_CLEAN
        st.augment = lambda xb: strong_augment(xb, data.info, st.g)
        # The classifier is not part of SupCon (frozen, so DDP does not wait on its gradient).
        model.classifier.requires_grad_(False)
        st.optimizer = torch.optim.SGD(
            [p for p in model.parameters() if p.requires_grad] + list(st.projector.parameters()),
            lr=cfg.st_lr,
            momentum=cfg.momentum,
            weight_decay=cfg.st_weight_decay,
        )
        engine.track({"st": model, "proj": st.projector}, {"st": st.optimizer}, generators={"st": st.g})
        st.net = ctx.wrap_model(SupConNet(model, st.projector))

    n_batches = math.ceil(n / cfg.st_batch_size)

    def supcon_epoch(i: int) -> dict[str, Any]:
        epoch = i + 1
        st.net.train()

        def batch_loss(numbered: tuple[int, torch.Tensor]) -> torch.Tensor:
            batch, idx = numbered
            set_lr(st.optimizer, supcon_lr(cfg, epoch, batch, n_batches))
            x = to_float(data.x_train[idx])
            z = st.net(torch.cat([st.augment(x), st.augment(x)]))
            return supcon_loss(
                z[: len(idx)],
                z[len(idx) :],
                data.y_train[idx],
                st.is_clean[idx],
                cfg.st_supcon_temperature,
                cfg.st_base_temperature,
                cfg.st_positive_pool == "clean",
            )

        means = descend(st.optimizer, enumerate(defense.batches(n, cfg.st_batch_size, st.g)), batch_loss)
        _nearest_mean_probe(st.model, st.x_clean, st.y_clean, cfg.eval_batch_size)
        return {**sd_split.metrics, "st_supcon_loss": means.get("train_loss", torch.zeros((), device=device))}

    def begin_cls() -> None:
        # A fresh linear head on the frozen encoder, mixed CE over the clean and poisoned pools.
        st.model.requires_grad_(False)
        st.head = head = st.model.classifier
        head.requires_grad_(True)
        _fresh_head(head, defense.generator("st_head"))
        st.head_opt = torch.optim.SGD(
            head.parameters(), lr=cfg.st_cls_lr, momentum=cfg.momentum, weight_decay=cfg.st_cls_weight_decay
        )
        st.head_sched = torch.optim.lr_scheduler.MultiStepLR(st.head_opt, milestones=[60, 75, 90], gamma=0.2)
        engine.track(optimizers={"cls": st.head_opt}, schedulers={"cls": st.head_sched})
        train_idx = pool_indices(sd_split.pools, POOL_CLEAN, POOL_POISON)
        st.x_train, st.y_train = data.x_train[train_idx], data.y_train[train_idx]
        st.poisoned = sd_split.pools[train_idx] == POOL_POISON
        st.wrapped_head = ctx.wrap_model(head)

    def cls_epoch(_epoch: int) -> dict[str, Any]:
        st.model.eval()  # frozen encoder, BN statistics included
        st.head.train()

        def batch_loss(idx: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                features = st.model.features(st.augment(to_float(st.x_train[idx])))
            return mixed_cross_entropy(st.wrapped_head(features), st.y_train[idx], st.poisoned[idx], cfg.st_lambda_p)

        means = descend(st.head_opt, defense.batches(len(st.y_train), cfg.st_cls_batch_size, st.g), batch_loss)
        st.head_sched.step()
        return {**sd_split.metrics, "st_cls_loss": means.get("train_loss", torch.zeros((), device=device))}

    def evaluate() -> dict[str, float]:
        return defense.evaluate(st.model)

    last = engine.run(
        [
            *sd_run,
            Stage("st_supcon", cfg.st_epochs, supcon_epoch, evaluate, begin=begin_supcon),
            Stage("st_cls", cfg.st_cls_epochs, cls_epoch, evaluate, begin=begin_cls),
        ]
    )
    return defense.finish(st.model, last)
