"""Pieces every defense shares: the base config, the clean extra set, per-epoch evaluation with DER, and the
hand-off of per-sample scores and pools (written by the orchestrator as scores.parquet)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from methods.attacks.base import Backdoor, evaluate
from methods.core.blind_signals import blind_signals
from methods.core.context import RunContext
from methods.core.engine import Engine
from methods.core.metrics import POOL_NAMES, der, split_metrics
from methods.core.training import derive_seed, make_generator, minibatches, train_epoch, unwrap


@dataclass
class DefenseResult:
    """What a defense's run(ctx, cfg) returns: the final weights (for the model/ artifact) and final metrics."""

    model_state: dict[str, torch.Tensor]
    metrics: dict[str, float]
    model_name: str = ""


def stratified_quotas(sizes: list[int], total: int) -> list[int]:
    """How many of each class to take so that `total` are taken in proportion to `sizes` (largest remainders
    round), with at least one of every non-empty class whenever `total` allows it."""
    present = [i for i, size in enumerate(sizes) if size > 0]
    total = min(total, sum(sizes))
    quotas = [0] * len(sizes)
    floor = 1 if total >= len(present) else 0
    for i in present:
        quotas[i] = floor
    left = total - floor * len(present)
    room = [sizes[i] - quotas[i] for i in range(len(sizes))]
    while left > 0:
        weight = sum(room)
        shares = [left * r / weight for r in room]
        whole = [min(room[i], int(math.floor(shares[i]))) for i in range(len(sizes))]
        if sum(whole) == 0:  # fewer left than classes with room: the largest remainders take one each
            for i in sorted(range(len(sizes)), key=lambda i: (-(shares[i] - whole[i]), i))[:left]:
                whole[i] += 1
        for i, extra in enumerate(whole):
            quotas[i] += extra
            room[i] -= extra
            left -= extra
    return quotas


def clean_subset(backdoor: Backdoor, clean_ratio: float, clean_seed: int | None = None) -> torch.Tensor:
    """Indices of `clean_ratio` x N genuinely clean training images (the defender's clean extra set), drawn with
    the recorded clean-subset seed so the same indices serve every defense (and teacher and student).

    The set is stratified by class, in proportion to the clean images of each class and with every class
    present: a defender who collects a small clean set collects some of every class, whereas a uniform draw of
    63 digits can miss one, and a defense then unlearns that class instead of the trigger."""
    data = backdoor.data
    seed = backdoor.seeds["clean_seed"] if clean_seed is None else clean_seed
    labels, flags = data.y_train.cpu(), data.poison_flags.cpu()
    count = max(1, int(round(clean_ratio * len(labels))))
    by_class = [torch.nonzero((labels == k) & ~flags).flatten() for k in range(data.num_classes)]
    g = torch.Generator().manual_seed(int(seed))
    picked = [
        members[torch.randperm(len(members), generator=g)[:quota]]
        for members, quota in zip(by_class, stratified_quotas([len(m) for m in by_class], count))
    ]
    return torch.cat(picked).sort().values.to(data.y_train.device)


def split_blind_signals(
    model: nn.Module, backdoor: Backdoor, metrics: dict[str, float], split: str, batch_size: int = 1024
) -> dict[str, float]:
    """The blind signals of one split (adversarial concentration, the canary's ASR when one is planted) and the
    blind score built on them and on `metrics`' accuracy of that split."""
    out = blind_signals(model, backdoor.data, backdoor.blind, batch_size, splits=(split,))
    out[f"{split}_blind_score"] = metrics[f"{split}_acc"] - out[f"{split}_adv_concentration"]
    return out


def evaluate_with_der(model: nn.Module, backdoor: Backdoor, batch_size: int = 1024) -> dict[str, float]:
    """val/test ACC, ASR, RA of `model`, plus DER against the backdoored model's own figures, plus the validation
    split's blind signals. Every report and the final evaluation of every defense pass through here, so each
    reports the same blind signals; the test split's PGD, which no choice may read, is left to final_result."""
    metrics = evaluate(unwrap(model), backdoor.data, batch_size=batch_size)
    before = backdoor.metrics
    for split in ("val", "test"):
        metrics[f"{split}_der"] = der(
            before[f"{split}_acc"], before[f"{split}_asr"], metrics[f"{split}_acc"], metrics[f"{split}_asr"]
        )
    metrics.update(split_blind_signals(model, backdoor, metrics, "val", batch_size))
    return metrics


def evaluation(model: nn.Module, backdoor: Backdoor, batch_size: int = 1024) -> Callable[[], dict[str, float]]:
    """An engine stage's `evaluate`: `model` evaluated with DER after every step."""
    return lambda: evaluate_with_der(model, backdoor, batch_size)


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def final_result(
    ctx: RunContext,
    model: nn.Module,
    backdoor: Backdoor,
    last: tuple[int, dict[str, float]],
    extra: dict[str, float] | None = None,
    kept_step: int | None = None,
    batch_size: int = 1024,
) -> DefenseResult:
    """Every defense returns through here, so that its result is the model it returns.

    `last` is (step, metrics) of the run's last ctx.report ({} when a resumed run had nothing left to train);
    `kept_step` names the step whose weights `model` holds when a method keeps an earlier step (None: the last).
    The returned weights are evaluated; whenever the result (their evaluation, the last report's other values and
    `extra`) differs from what was last reported, it is reported once more at the next step, with `kept_step`.
    What the orchestrator records, ranks and tabulates is the last report, so it always describes the weights
    saved as the run's model and never a step that was discarded.

    The test split's blind signals are measured here only, for the returned weights: they are part of the result
    (and of a final report), but no step report carries them, so they alone never make the result differ (the
    orchestrator logs them at the last reported step, orchestrator.execute.execute_defense)."""
    step, reported = last
    evaluated = evaluate_with_der(model, backdoor, batch_size)
    metrics = {**reported, **(extra or {}), **evaluated}
    differs = set(metrics) != set(reported) or not all(_same(float(v), float(reported[k])) for k, v in metrics.items())
    if kept_step is not None and kept_step != step:
        differs = True
    metrics.update(split_blind_signals(model, backdoor, evaluated, "test", batch_size))
    if differs:
        metrics["kept_step"] = float(step if kept_step is None else kept_step)
        ctx.report(metrics, step=step + 1)
        ctx.progress(f"final report at step {step + 1}: the returned model, kept from step {int(metrics['kept_step'])}")
    state = {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}
    return DefenseResult(state, metrics, backdoor.model_name)


class DefenseRun:
    """The plumbing every defense's run(ctx, cfg) shares, so that its file holds only its algorithm: the suspect
    model's artifact and data on the training device, the engine that steps, reports, checkpoints and resumes the
    run, one generator per random purpose drawn from the defense seed, batches split across the context's ranks,
    evaluation with DER at the configured batch size, and the returned model's final result."""

    def __init__(self, ctx: RunContext, cfg) -> None:
        self.ctx, self.cfg, self.device = ctx, cfg, ctx.device
        self.backdoor: Backdoor = ctx.backdoor().to(ctx.device)
        self.data = self.backdoor.data
        self.engine = Engine(ctx)

    def generator(self, purpose: str) -> torch.Generator:
        """A generator of its own for `purpose`, so that each random stream resumes and reproduces alone."""
        return make_generator(derive_seed(self.cfg.seed, purpose), self.device)

    def clean_subset(self) -> torch.Tensor:
        """The defender's clean extra set (its `clean_ratio`), the same images for every defense of the attack."""
        return clean_subset(self.backdoor, self.cfg.clean_ratio, self.cfg.clean_seed)

    def batches(self, n: int, batch_size: int, generator: torch.Generator | None, drop_last: bool = False):
        """Index batches over n samples, this rank's share of each under a multi-worker context."""
        return minibatches(n, batch_size, generator, self.device, drop_last, self.ctx.rank, self.ctx.world_size)

    def train_epoch(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        x_uint8: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        generator: torch.Generator,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """methods.core.training.train_epoch on this context's ranks."""
        extra = {} if loss_fn is None else {"loss_fn": loss_fn}
        return train_epoch(
            model,
            optimizer,
            x_uint8,
            y,
            batch_size,
            generator,
            augment,
            **extra,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
        )

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return evaluate_with_der(model, self.backdoor, self.cfg.eval_batch_size)

    def evaluation(self, model: nn.Module) -> Callable[[], dict[str, float]]:
        """A stage's `evaluate`: `model` evaluated with DER after every step."""
        return evaluation(model, self.backdoor, self.cfg.eval_batch_size)

    def finish(
        self,
        model: nn.Module,
        last: tuple[int, dict[str, float]],
        extra: dict[str, float] | None = None,
        kept_step: int | None = None,
    ) -> DefenseResult:
        """The run's result: `model` (the weights of `kept_step`, or of the last step), see final_result."""
        return final_result(self.ctx, model, self.backdoor, last, extra, kept_step, self.cfg.eval_batch_size)


def hand_off_scores(
    ctx: RunContext, backdoor: Backdoor, scores: torch.Tensor | np.ndarray, pools: torch.Tensor | np.ndarray
) -> dict[str, float]:
    """Hand every training sample's score and pool (0 clean, 1 poison, 2 uncertain) over for scores.parquet;
    returns the split metrics of that final split."""
    data = backdoor.data
    as_np = lambda a: a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)  # noqa: E731
    pools_np, flags = as_np(pools).astype(np.int64), as_np(data.poison_flags).astype(bool)
    ctx.hand_off(
        "scores",
        {
            "index": np.arange(len(flags)),
            "label": as_np(data.y_train),
            "original_label": as_np(data.y_train_orig),
            "true_poisoned": flags,
            "score": as_np(scores).astype(np.float64),
            "pool": np.array([POOL_NAMES[int(p)] for p in pools_np]),
        },
    )
    return split_metrics(pools_np, flags, as_np(scores))
