"""D-BR: SD's sample split, then backdoor removal by unlearning the poisoned pool and relearning the clean pool.

Chen, Wu, Wang, "Effective Backdoor Defense by Exploiting Sensitivity of Poisoned Samples", NeurIPS 2022
(methods.md section 5.3). Starting from the backdoored model, every round runs one epoch of gradient ascent on
the cross-entropy of the suspected-poisoned pool (its dataset labels, i.e. the target), then relearning epochs of
ordinary descent on the suspected-clean pool, both with the dataset's standard augmentation and one SGD optimizer.

Deviations from the official code:
- the kept round is the one with the largest val_acc - val_asr (validation split), not test ACC - test ASR; the
  final metrics are that round's (`br_select="last"` keeps the last round instead);
- the unlearning phase's lr is br_lr x `br_unlearn_lr_scale` (methods.md REC, default 1.0: the code's single lr)
  and `br_relearn_epochs` (default 1, as the code) sets the relearning per round, so the balance of the two
  phases can be tuned: unbounded ascent wrecks a model once its lr is a little too large;
- SD follows `sd` (see its deviations).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from methods.core.config import choice, ranged
from methods.core.context import RunContext
from methods.core.method import register_method
from methods.core.metrics import POOL_CLEAN, POOL_POISON
from methods.core.training import derive_seed, full_state, make_generator, restore_full_state, sgd, train_epoch
from methods.data.augment import standard_augment
from methods.defenses.common import final_result, report_eval
from methods.defenses.sd import SDConfig, pool_indices, run_sd


@dataclass
class DBRConfig(SDConfig):
    br_rounds: int = ranged(20, 1, 10_000, "unlearn/relearn rounds")
    br_lr: float = ranged(1e-4, 0.0, 10.0, "SGD lr of the relearning phase (and, scaled, of the unlearning)")
    br_unlearn_lr_scale: float = ranged(1.0, 0.0, 1000.0, "unlearning lr = br_lr x this")
    br_relearn_epochs: int = ranged(1, 1, 1000, "epochs on the clean pool per round")
    br_batch_size: int = ranged(128, 1, 65_536)
    br_select: str = choice("val_acc_minus_asr", ("val_acc_minus_asr", "last"), "which round's model is kept")


def _ascent(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(logits, labels)


@register_method("dbr", kind="defense", config=DBRConfig, splits_samples=True)
def run(ctx: RunContext, cfg: DBRConfig):
    backdoor = ctx.backdoor().to(ctx.device)
    data = backdoor.data
    state = ctx.load_state()
    sd = run_sd(ctx, cfg, backdoor, state)

    model = backdoor.build_model(ctx.device)
    optimizer = sgd(model.parameters(), cfg.br_lr, cfg.momentum, cfg.weight_decay)
    g = make_generator(derive_seed(cfg.seed, "br"), ctx.device)
    models, opts, gens = {"br": model}, {"br": optimizer}, {"br": g}
    kept = {"round": 0, "score": float("-inf"), "metrics": {}, "weights": {}}
    done = 0
    if state is not None and state["extra"].get("stage") == "br":
        done = restore_full_state(state, models, opts, {}, gens) - sd.step
        kept = state["extra"]["kept"]

    clean, poison = pool_indices(sd.pools, POOL_CLEAN), pool_indices(sd.pools, POOL_POISON)
    x_clean, y_clean = data.x_train[clean], data.y_train[clean]
    x_poison, y_poison = data.x_train[poison], data.y_train[poison]
    augment = lambda xb: standard_augment(xb, data.info, g)  # noqa: E731
    wrapped = ctx.wrap_model(model)
    for rnd in range(done + 1, cfg.br_rounds + 1):
        optimizer.param_groups[0]["lr"] = cfg.br_lr * cfg.br_unlearn_lr_scale
        unlearn = train_epoch(wrapped, optimizer, x_poison, y_poison, cfg.br_batch_size, g, augment, _ascent,
                              rank=ctx.rank, world_size=ctx.world_size)
        optimizer.param_groups[0]["lr"] = cfg.br_lr
        for _ in range(cfg.br_relearn_epochs):
            relearn = train_epoch(wrapped, optimizer, x_clean, y_clean, cfg.br_batch_size, g, augment,
                                  rank=ctx.rank, world_size=ctx.world_size)
        step = sd.step + rnd
        metrics = report_eval(ctx, model, backdoor, step, {
            **sd.split, "br_round": float(rnd), "br_unlearn_loss": -unlearn.item(), "br_relearn_loss": relearn.item(),
        }, cfg.eval_batch_size)
        score = metrics["val_acc"] - metrics["val_asr"]
        if cfg.br_select == "last" or score > kept["score"]:
            weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            kept = {"round": rnd, "score": score, "metrics": metrics, "weights": weights}
        ctx.save_state(full_state(step, models, opts, {}, gens, extra={"stage": "br", "kept": kept, **sd.extra()}))

    model.load_state_dict(kept["weights"])
    return final_result(model, {**kept["metrics"], "br_kept_round": float(kept["round"])}, backdoor.model_name)
