"""PBE: progressive backdoor erasing without clean data, by adversarial fine-tuning on a growing trusted subset.

Mu, Niu, Wang, Chen, "Progressive Backdoor Erasing via connecting Backdoor and Adversarial Attacks", CVPR 2023
(methods.md section 4.4, Algorithm 1 of the paper). The infected model's logits on every (poisoned) training image
are recorded once. Starting from a random `init_fraction` of the training set, each progressive step fine-tunes
on the trusted subset (step 0 entirely on PGD examples, later steps only on the first `later_adv_batches`
batches of their first epoch), then scores every training image by how little its logits moved,
0.5 + 0.5 cos(z_0, z_s); the top `top_rates[s]` fraction becomes the next trusted subset. Poisoned images leave
the target class as the backdoor is erased, so their similarity drops and they stay out of the subset.

Reports: `step` counts epochs across progressive steps (step s, epoch e -> s * epochs_per_step + e). Every report
carries the split metrics of the subset being trained on (trusted = clean pool, the rest = uncertain pool, so
pool_clean_poisoned_frac is the poisoned fraction of the trusted subset) and, once a re-scoring exists, the
AUROC of its scores. The hand-off score is 1 - similarity, so higher means more suspicious.

Deviations from the official code (github.com/John-niu-07/BPE), following methods.md:
- PGD with random start and [0, 1] clamping (REC), as in AFT; the flags restore the original loop.
- The top-rate list has no entry after the last step, where the code fails with an index error; here the last
  re-scoring only produces the final scores.
- With top_rates None, the rates are a linear ramp top_rate_first .. top_rate_last over the n_steps - 1
  re-selections (methods.md's parametrisation for sweeps, so n_steps can vary); the code's list is the default.
- The optimizer and its momentum carry across steps as in the code; `reset_optimizer_each_step` resets them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from methods.core.config import listed, ranged
from methods.core.context import RunContext
from methods.core.method import register_method
from methods.core.metrics import POOL_CLEAN, POOL_UNCERTAIN, split_metrics
from methods.core.training import (
    derive_seed,
    full_state,
    make_generator,
    predict_logits,
    restore_full_state,
    sgd,
)
from methods.defenses.aft import AdversarialFinetuneConfig, adversarial_finetune_epoch
from methods.defenses.common import DefenseResult, evaluate_with_der, final_result, hand_off_scores, report_eval


@dataclass
class PBEConfig(AdversarialFinetuneConfig):
    init_fraction: float = ranged(0.05, 0.0, 1.0, "random initial trusted subset, as a fraction of the training set")
    n_steps: int = ranged(4, 1, 1000, "progressive steps (step 0 plus refinements)")
    epochs_per_step: int = ranged(10, 1, 100_000)
    top_rates: Optional[list[float]] = listed([0.2, 0.5, 0.7], 0.0, 1.0,
                                              "trusted fraction after steps 0 .. n_steps - 2 (None: the ramp below)")
    top_rate_first: float = ranged(0.2, 0.0, 1.0, "when top_rates is None: the rate after step 0 ...")
    top_rate_last: float = ranged(0.7, 0.0, 1.0, "... rising linearly to this rate after step n_steps - 2")
    later_adv_batches: Optional[int] = ranged(31, 0, None, "adversarial batches of the first epoch of steps >= 1 (None: all)")
    reset_optimizer_each_step: bool = False

    def rates(self) -> list[float]:
        """The trusted fraction chosen after each step but the last (n_steps - 1 values)."""
        if self.top_rates is not None:
            return list(self.top_rates)
        m = self.n_steps - 1
        if m == 1:
            return [self.top_rate_last]
        return [self.top_rate_first + (self.top_rate_last - self.top_rate_first) * k / (m - 1) for k in range(m)]

    def validate(self) -> None:
        if self.init_fraction <= 0:
            raise ValueError(f"init_fraction: {self.init_fraction} must be > 0")
        if self.top_rates is None:
            for name in ("top_rate_first", "top_rate_last"):
                if getattr(self, name) <= 0:
                    raise ValueError(f"{name}: {getattr(self, name)} must be in (0, 1]")
            return
        if any(r <= 0 for r in self.top_rates):
            raise ValueError(f"top_rates: every rate must be in (0, 1], got {self.top_rates}")
        if len(self.top_rates) != self.n_steps - 1:
            raise ValueError(f"top_rates: {len(self.top_rates)} entries, but n_steps={self.n_steps} re-selects "
                             f"{self.n_steps - 1} times (or set top_rates to None to use the top_rate_first/last ramp)")


def logit_similarity(reference: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """0.5 + 0.5 cos(reference_i, current_i) per row of raw logits, in [0, 1]; 1 = the prediction did not move."""
    return 0.5 + 0.5 * F.cosine_similarity(reference, current, dim=1)


def top_fraction_mask(similarity: torch.Tensor, rate: float) -> torch.Tensor:
    """The trusted subset: the round(rate x N) most similar samples (at least one); ties keep the lower index."""
    count = max(1, int(round(rate * len(similarity))))
    order = torch.argsort(similarity, descending=True, stable=True)
    mask = torch.zeros(len(similarity), dtype=torch.bool, device=similarity.device)
    mask[order[:count]] = True
    return mask


def random_mask(n: int, fraction: float, seed: int, device: torch.device) -> torch.Tensor:
    count = max(1, int(round(fraction * n)))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count]] = True
    return mask.to(device)


def trusted_pools(mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, POOL_CLEAN, POOL_UNCERTAIN)


@register_method("pbe", kind="defense", config=PBEConfig, splits_samples=True)
def run(ctx: RunContext, cfg: PBEConfig) -> DefenseResult:
    backdoor = ctx.backdoor().to(ctx.device)
    data = backdoor.data
    model = backdoor.build_model(ctx.device)
    n = len(data.y_train)
    # Recomputed on resume rather than checkpointed: eval-mode logits of the untouched infected model.
    reference = predict_logits(model, data.x_train, cfg.eval_batch_size)
    rates = cfg.rates()

    optimizer = sgd(model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    g_train = make_generator(derive_seed(cfg.seed, "train"), ctx.device)
    g_pgd = make_generator(derive_seed(cfg.seed, "pgd"), ctx.device)
    models, opts, gens = {"model": model}, {"opt": optimizer}, {"train": g_train, "pgd": g_pgd}
    trusted = random_mask(n, cfg.init_fraction, derive_seed(cfg.seed, "pbe_init"), ctx.device)
    similarity: Optional[torch.Tensor] = None
    start = 0
    state = ctx.load_state()
    if state is not None:
        start = restore_full_state(state, models, opts, {}, gens)
        trusted = state["extra"]["trusted"].to(ctx.device)
        saved = state["extra"]["similarity"]
        similarity = None if saved is None else saved.to(ctx.device)
    wrapped = ctx.wrap_model(model)
    ctx.progress(f"pbe: {n} training images, {int(trusted.sum())} trusted at start, rates {rates}")

    metrics: dict[str, float] = {}
    total = cfg.n_steps * cfg.epochs_per_step
    for step in range(start + 1, total + 1):
        stage, epoch = divmod(step - 1, cfg.epochs_per_step)
        epoch += 1
        if epoch == 1 and stage > 0 and cfg.reset_optimizer_each_step:
            optimizer.state.clear()
        if stage == 0:
            adv_batches: Optional[int] = None
        elif epoch == 1:
            adv_batches = cfg.later_adv_batches
        else:
            adv_batches = 0
        idx = torch.nonzero(trusted).flatten()
        loss = adversarial_finetune_epoch(wrapped, optimizer, data.x_train[idx], data.y_train[idx], cfg, data.info,
                                          g_train, g_pgd, adv_batches, ctx.rank, ctx.world_size)
        trained_on = trusted
        if epoch == cfg.epochs_per_step:
            similarity = logit_similarity(reference, predict_logits(model, data.x_train, cfg.eval_batch_size))
            if stage < cfg.n_steps - 1:
                trusted = top_fraction_mask(similarity, rates[stage])
        split = split_metrics(trusted_pools(trained_on), data.poison_flags,
                              None if similarity is None else 1.0 - similarity)
        metrics = report_eval(ctx, model, backdoor, step,
                              {"train_loss": loss.item(), "pbe_step": float(stage), **split}, cfg.eval_batch_size)
        ctx.save_state(full_state(step, models, opts, {}, gens,
                                  extra={"trusted": trusted.cpu(),
                                         "similarity": None if similarity is None else similarity.cpu()}))

    assert similarity is not None, "the last epoch of every step re-scores"
    final_split = hand_off_scores(ctx, backdoor, 1.0 - similarity, trusted_pools(trusted))
    if not metrics:  # resumed after the last step
        metrics = evaluate_with_der(model, backdoor, cfg.eval_batch_size)
    return final_result(model, {**metrics, **final_split}, backdoor.model_name)
