"""SD: sample distinguishment by feature consistency towards transformations (FCT), the first module of D-BR/D-ST.

Chen, Wu, Wang, "Effective Backdoor Defense by Exploiting Sensitivity of Poisoned Samples", NeurIPS 2022
(docs/methods.md#sd). A model trained briefly without augmentation (or, with `fct_model="backdoored"`,
the attack's fully trained model) is fine-tuned to push class centroids apart; every training sample is then
scored by how far its penultimate feature moves under a random transformation, and the training set is split
into a clean pool (lowest scores, fraction alpha_c), a poisoned pool (highest, alpha_p) and an uncertain rest.
`dbr` and `dst` run `sd_stages` first.

The `rotate_affine` tau is drawn and applied as the official code does it (torchvision's RandomRotation, then
RandomAffine with whole-pixel shifts, both nearest with zero fill; methods/data/augment.py). `fct_resample:
bilinear` is bdo's earlier tau (fractional shifts, one bilinear resample), which the digits presets keep because
it separates Blend there (docs/methods.md#sd has the comparison).

Deviations from the official code:
- the split is made by rank on one set of scores (averaged over `fct_n_draws` transformation draws), so the
  pools hold exactly floor(alpha_c N) / floor(alpha_p N) samples (a fix docs/methods.md#sd recommends); the code's
  second scoring pass with a fresh transformation against the first pass's thresholds is `split_rescore=True`;
- the FCT score is the mean over feature dimensions of the squared change, as in the code (the paper's sum
  divided by the feature width; same ranking);
- `fct_model="backdoored"` scores with the attacked model instead of the short no-augmentation one (an option).
  On digits (BadNets / Blend, seed 0, the digits preset's bilinear tau) the short model's poison-pool precision is
  0.42 / 0.23 without the centroid fine-tuning but 1.0 / 0.98 after the paper's 10 epochs of it (val_fct_auroc
  ~1.0), against val_fct_auroc 0.59 / 0.30 for the backdoored model, so the paper's choice stays the default and
  the preset; on WaNet, which the paper never evaluates, the backdoored model scores better (docs/methods.md#sd);
- the `flip` transform always flips (a random flip would give half of the samples a score of exactly 0);
- besides the split metrics against the true flags (reporting only), SD reports `val_fct_auroc`: the AUROC of
  the FCT score separating the triggered validation images from the clean ones, a validation-only measure of
  the score's quality for model selection and tuning.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.attacks.base import Backdoor
from methods.core.context import RunContext
from methods.core.engine import Stage
from methods.core.method import register_method
from methods.core.metrics import POOL_CLEAN, POOL_POISON, POOL_UNCERTAIN, auroc
from methods.core.training import derive_seed, sgd, to_float, unwrap
from methods.data.augment import horizontal_flip, random_crop, random_rotate_translate
from methods.data.configs import DatasetInfo
from methods.defenses.configs.sd import SDConfig
from methods.defenses.shared.common import DefenseRun, hand_off_scores
from methods.models.base import BackdoorModel, build_model

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


# ------------------------------------------------------------------------------------------------ loss pieces
def centroid_separation_loss(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean pairwise cosine similarity of the batch's class centroids (the code's "intra-class loss").

    The mean runs over all K' x K' entries of the similarity matrix of the K' classes present, with the diagonal
    zeroed but still counted. Absent classes have zero centroids and so add nothing; no host sync is needed."""
    onehot = F.one_hot(labels, num_classes).to(features.dtype)
    counts = onehot.sum(0)
    centroids = F.normalize((onehot.t() @ features) / counts.clamp(min=1).unsqueeze(1), dim=1)
    similarity = centroids @ centroids.t()
    present = (counts > 0).to(features.dtype).sum()
    return (similarity.sum() - similarity.diagonal().sum()) / present.square()


def _gaussian_blur(x: torch.Tensor, kernel: int, sigma_lo: float, sigma_hi: float, g: torch.Generator) -> torch.Tensor:
    """Per-image Gaussian blur (sigma uniform in [sigma_lo, sigma_hi]) as one grouped, separable convolution."""
    b, c, h, w = x.shape
    kernel = min(kernel, 2 * min(h, w) - 1)  # reflect padding needs pad < size
    sigma = sigma_lo + (sigma_hi - sigma_lo) * torch.rand(b, generator=g, device=x.device)
    offsets = torch.arange(kernel, device=x.device, dtype=x.dtype) - kernel // 2
    weights = torch.exp(-offsets.square() / (2 * sigma.square().unsqueeze(1)))
    weights = (weights / weights.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, k)
    pad = kernel // 2
    flat = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, weights.view(b * c, 1, 1, kernel), groups=b * c)
    flat = F.conv2d(flat, weights.view(b * c, 1, kernel, 1), groups=b * c)
    return flat.view(b, c, h, w)


def _random_erase(x: torch.Tensor, scale_lo: float, scale_hi: float, g: torch.Generator) -> torch.Tensor:
    """Zero one random rectangle per image: area fraction in [scale_lo, scale_hi], aspect ratio 0.3..3.3."""
    b, _, h, w = x.shape
    area = scale_lo + (scale_hi - scale_lo) * torch.rand(b, generator=g, device=x.device)
    log_ratio = math.log(0.3) + (math.log(3.3) - math.log(0.3)) * torch.rand(b, generator=g, device=x.device)
    ratio = torch.exp(log_ratio)
    eh = (torch.sqrt(area * ratio) * h).round().clamp(1, h)
    ew = (torch.sqrt(area / ratio) * w).round().clamp(1, w)
    top = (torch.rand(b, generator=g, device=x.device) * (h - eh + 1)).floor()
    left = (torch.rand(b, generator=g, device=x.device) * (w - ew + 1)).floor()
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (
        (rows >= top.view(b, 1, 1))
        & (rows < (top + eh).view(b, 1, 1))
        & (cols >= left.view(b, 1, 1))
        & (cols < (left + ew).view(b, 1, 1))
    )
    return x.masked_fill(inside.unsqueeze(1), 0.0)


def fct_transform(cfg: SDConfig, info: DatasetInfo) -> Transform:
    """The FCT transformation tau chosen by the config, as a batched function of (images, generator)."""
    name = cfg.fct_transform
    if name == "rotate_affine":
        return lambda x, g: random_rotate_translate(x, cfg.fct_rotation_deg, cfg.fct_translate, g, cfg.fct_resample)
    if name == "rotate":
        return lambda x, g: random_rotate_translate(x, cfg.fct_rotation_deg, 0.0, g, cfg.fct_resample)
    if name == "affine":
        return lambda x, g: random_rotate_translate(x, 0.0, cfg.fct_translate, g, cfg.fct_resample)
    if name == "flip":
        return lambda x, g: horizontal_flip(x, g, p=1.0)
    if name == "crop":
        pad = info.crop_pad if cfg.fct_crop_pad is None else cfg.fct_crop_pad
        return lambda x, g: random_crop(x, pad, g)
    if name == "blur":
        return lambda x, g: _gaussian_blur(x, cfg.fct_blur_kernel, cfg.fct_blur_sigma_min, cfg.fct_blur_sigma_max, g)
    return lambda x, g: _random_erase(x, cfg.fct_erase_scale_min, cfg.fct_erase_scale_max, g)


@torch.no_grad()
def fct_scores(
    model: nn.Module,
    x_uint8: torch.Tensor,
    transform: Transform,
    g: torch.Generator,
    n_draws: int = 1,
    batch_size: int = 1024,
) -> torch.Tensor:
    """FCT(x) = mean over feature dimensions of (f(x) - f(tau(x)))^2, averaged over `n_draws` draws of tau,
    for every image (eval mode; the model's train/eval mode is restored)."""
    inner = unwrap(model)
    was_training = inner.training
    inner.eval()
    out = []
    for start in range(0, len(x_uint8), batch_size):
        x = to_float(x_uint8[start : start + batch_size])
        reference = inner.features(x)
        total = torch.zeros(len(x), device=x.device)
        for _ in range(n_draws):
            total += (inner.features(transform(x, g)) - reference).square().mean(1)
        out.append(total / n_draws)
    inner.train(was_training)
    return torch.cat(out) if out else torch.empty(0, device=x_uint8.device)


def split_by_rank(scores: torch.Tensor, alpha_c: float, alpha_p: float) -> torch.Tensor:
    """Pools by rank: the floor(alpha_c N) lowest scores are clean, the floor(alpha_p N) highest poisoned."""
    n = len(scores)
    n_clean, n_poison = int(math.floor(alpha_c * n)), int(math.floor(alpha_p * n))
    order = torch.argsort(scores, stable=True)
    pools = torch.full((n,), POOL_UNCERTAIN, dtype=torch.int64, device=scores.device)
    pools[order[:n_clean]] = POOL_CLEAN
    pools[order[n - n_poison :]] = POOL_POISON
    return pools


def split_by_thresholds(reference: torch.Tensor, scores: torch.Tensor, alpha_c: float, alpha_p: float) -> torch.Tensor:
    """The code's split: thresholds gamma_c / gamma_p at ranks floor(alpha_c N) / N - floor(alpha_p N) of the
    `reference` scores, applied to a second set of `scores` (so the pools are only about alpha_c / alpha_p)."""
    n = len(reference)
    ranked = torch.sort(reference).values
    n_clean, n_poison = int(math.floor(alpha_c * n)), int(math.floor(alpha_p * n))
    pools = torch.full((n,), POOL_UNCERTAIN, dtype=torch.int64, device=scores.device)
    if n_clean > 0:
        pools[scores <= ranked[min(n_clean, n - 1)]] = POOL_CLEAN
    if n_poison > 0:
        pools[scores >= ranked[n - n_poison]] = POOL_POISON
    return pools


# ------------------------------------------------------------------------------------------------ the SD stage
class _Penultimate(nn.Module):
    """Forward = the penultimate feature, so the centroid loss trains through `ctx.wrap_model` (DDP)."""

    def __init__(self, model: BackdoorModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


def sd_steps(cfg: SDConfig) -> int:
    """How many steps SD reports: pre-training epochs (short model only), fine-tuning epochs, the split."""
    return (cfg.sd_pretrain_epochs if cfg.fct_model == "short" else 0) + cfg.sd_ft_epochs + 1


def _val_fct_auroc(
    model: nn.Module, backdoor: Backdoor, transform: Transform, g: torch.Generator, cfg: SDConfig
) -> float:
    x_val, _ = backdoor.data.clean_set("val")
    x_triggered = backdoor.data.backdoor_set("val")[0]
    clean = fct_scores(model, x_val, transform, g, cfg.fct_n_draws, cfg.eval_batch_size)
    triggered = fct_scores(model, x_triggered, transform, g, cfg.fct_n_draws, cfg.eval_batch_size)
    flags = torch.cat([torch.zeros(len(clean), dtype=torch.bool), torch.ones(len(triggered), dtype=torch.bool)])
    return auroc(torch.cat([clean, triggered]), flags)


class SDSplit:
    """What SD's split hands the module after it (D-BR's unlearning, D-ST's training): every training sample's
    score and pool (POOL_CLEAN, POOL_POISON, POOL_UNCERTAIN) and the split's metrics (split_* and
    val_fct_auroc, which D-BR and D-ST report with every later step). Held among the engine's checkpointed values,
    so a run resumed past the split reads them back; None (metrics: {}) until the split step has run."""

    def __init__(self, kept) -> None:
        self._kept = kept

    @property
    def scores(self) -> torch.Tensor | None:
        return self._kept.scores

    @property
    def pools(self) -> torch.Tensor | None:
        return self._kept.pools

    @property
    def metrics(self) -> dict[str, float]:
        return self._kept.split


def sd_stages(defense: DefenseRun) -> tuple[list[Stage], BackdoorModel, SDSplit]:
    """SD's stages (steps 1..sd_steps(cfg)): pre-training (short model only), centroid fine-tuning, the split.
    Returns them with the FCT model and the split they will produce. The split hands the scores over, again after
    a resume past it."""
    ctx, cfg, backdoor, engine = defense.ctx, defense.cfg, defense.backdoor, defense.engine
    data = backdoor.data
    device = ctx.device
    if cfg.fct_model == "short":
        torch.manual_seed(derive_seed(cfg.seed, "sd_init"))
        model = build_model(backdoor.model_name, data.info).to(device)
    else:
        model = backdoor.build_model(device)
    optimizer = sgd(model.parameters(), cfg.sd_pretrain_lr, cfg.momentum, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.sd_cosine_t_max)
    g_train, g_fct = defense.generator("sd_train"), defense.generator("sd_fct")
    engine.track({"fct": model}, {"sd": optimizer}, {"sd": scheduler}, {"sd": g_train, "fct": g_fct})
    kept = engine.keep(scores=None, pools=None, split={})
    engine.on_resume(lambda: None if kept.scores is None else hand_off_scores(ctx, backdoor, kept.scores, kept.pools))
    num_classes = data.info.num_classes
    transform = fct_transform(cfg, data.info)
    trainer: dict[str, nn.Module] = {}  # what the current stage trains through, wrapped once per stage

    def begin_pretrain() -> None:
        trainer["net"] = ctx.wrap_model(model)

    def pretrain(_epoch: int) -> dict[str, torch.Tensor]:
        loss = defense.train_epoch(trainer["net"], optimizer, data.x_train, data.y_train, cfg.sd_batch_size, g_train)
        scheduler.step()
        return {"sd_loss": loss}

    def begin_centroid() -> None:
        # The centroid loss gives the classifier no gradient; freezing it keeps DDP from waiting on it.
        model.classifier.requires_grad_(False)
        trainer["net"] = ctx.wrap_model(_Penultimate(model))

    def centroid(_epoch: int) -> dict[str, torch.Tensor]:
        loss = defense.train_epoch(
            trainer["net"],
            optimizer,
            data.x_train,
            data.y_train,
            cfg.sd_batch_size,
            g_train,
            loss_fn=lambda f, y: centroid_separation_loss(f, y, num_classes),
        )
        scheduler.step()
        return {"sd_loss": loss}

    def split(_: int) -> dict[str, float]:
        scores = fct_scores(model, data.x_train, transform, g_fct, cfg.fct_n_draws, cfg.eval_batch_size)
        if cfg.split_rescore:
            rescored = fct_scores(model, data.x_train, transform, g_fct, cfg.fct_n_draws, cfg.eval_batch_size)
            pools = split_by_thresholds(scores, rescored, cfg.alpha_c, cfg.alpha_p)
            scores = rescored
        else:
            pools = split_by_rank(scores, cfg.alpha_c, cfg.alpha_p)
        kept.scores, kept.pools = scores, pools
        kept.split = {
            **hand_off_scores(ctx, backdoor, scores, pools),
            "val_fct_auroc": _val_fct_auroc(model, backdoor, transform, g_fct, cfg),
        }
        return kept.split

    evaluate = defense.evaluation(model)
    pretrain_epochs = cfg.sd_pretrain_epochs if cfg.fct_model == "short" else 0
    stages = [
        Stage("sd_pretrain", pretrain_epochs, pretrain, evaluate, begin=begin_pretrain),
        Stage("sd_centroid", cfg.sd_ft_epochs, centroid, evaluate, begin=begin_centroid),
        Stage("sd_split", 1, split, evaluate, begin=lambda: model.classifier.requires_grad_(True)),
    ]
    return stages, model, SDSplit(kept)


def pool_indices(pools: torch.Tensor, *codes: int) -> torch.Tensor:
    """Sorted indices of the samples in any of the given pools."""
    member = torch.zeros_like(pools, dtype=torch.bool)
    for code in codes:
        member |= pools == code
    return torch.nonzero(member).flatten()


@register_method("sd")
def run(ctx: RunContext, cfg: SDConfig):
    defense = DefenseRun(ctx, cfg)
    stages, model, _ = sd_stages(defense)
    return defense.finish(model, defense.engine.run(stages))
