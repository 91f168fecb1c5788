"""D-BR: SD's sample split, then backdoor removal by unlearning the poisoned pool and relearning the clean pool.

Chen, Wu, Wang, "Effective Backdoor Defense by Exploiting Sensitivity of Poisoned Samples", NeurIPS 2022
(docs/methods.md#d-br). Starting from the backdoored model, every round runs one epoch of gradient ascent on
the cross-entropy of the suspected-poisoned pool (its dataset labels, i.e. the target), then relearning epochs of
ordinary descent on the suspected-clean pool, both with the dataset's standard augmentation and one SGD optimizer.

Deviations from the official code:
- the official code keeps the round with the largest test ACC - test ASR. Here the round is chosen on the
  validation split only, by a bounded rule (`br_select`, see DBRConfig): the lowest val_asr among the rounds whose
  val_acc is within `br_acc_margin` of the best val_acc of any round; under knowledge blind, which may not read
  val_asr, the same margin rule on the canary's val ASR when a canary is planted, else on the share of the
  suspected-poisoned pool the model still fits (`br_poison_pool_fit`, reported every round: a surviving backdoor
  keeps its images on the target label); best_val_acc and the adversarial concentration (methods/core/
  blind_signals.py) may be chosen instead, and kept rounds the backdoor had survived on digits. ACC - ASR
  accepts any accuracy loss that buys a larger ASR drop (it prefers ACC 0.85 / ASR 0.00 to ACC 0.98 / ASR 0.14).
  Every round reports `br_kept_round` (the choice so far) and `br_acc_floor`; when the kept round is not the
  last, the returned model is reported once more as the final step (methods.defenses.shared.common.final_result);
- the unlearning phase's lr is br_lr x `br_unlearn_lr_scale` (a fix docs/methods.md#d-br recommends, default 1.0:
  the code's single lr) and `br_relearn_epochs` (default 1, as the code) sets the relearning per round, so the
  balance of the two phases can be tuned: unbounded ascent wrecks a model once its lr is a little too large;
- SD follows `sd` (see its deviations).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from methods.core.context import RunContext
from methods.core.engine import Stage
from methods.core.method import register_method
from methods.core.metrics import POOL_CLEAN, POOL_POISON, accuracy
from methods.core.schedules import set_lr
from methods.core.training import predict_logits, sgd
from methods.data.augment import standard_augment
from methods.defenses.configs.dbr import BR_MARGIN_METRICS, DBRConfig
from methods.defenses.sd import pool_indices, sd_stages
from methods.defenses.shared.common import DefenseRun


def _ascent(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(logits, labels)


def _beats(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Round a is at least as good as b on both val ACC and the minimised metric (the later round wins a tie)."""
    return (
        a["acc"] >= b["acc"]
        and a["risk"] <= b["risk"]
        and (a["acc"], -a["risk"], a["round"]) > (b["acc"], -b["risk"], b["round"])
    )


def update_candidates(
    candidates: list[dict[str, Any]], new: dict[str, Any], margin: float, rule: str, ceiling: float = float("inf")
) -> list[dict[str, Any]]:
    """The rounds (dicts with round, acc, risk and whatever else the caller keeps) that the kept-round rule may
    still choose after more rounds; `risk` is the value a margin rule minimises (BR_MARGIN_METRICS). Under a
    margin rule the final choice is a round within the margin of min(the final best ACC, `ceiling`) that no other
    round beats on both ACC and risk; both properties only get stricter as rounds are added, so dropping the
    rounds that fail either now loses nothing, and only these rounds' weights need to be held. Under
    best_val_acc the only candidate is the best round so far, and last holds the newest."""
    if rule == "last":
        return [new]
    if rule == "best_val_acc":
        return [new] if not candidates or new["acc"] >= candidates[0]["acc"] else candidates
    pool = candidates + [new]
    floor = acc_floor(max(c["acc"] for c in pool), margin, ceiling)
    return [c for c in pool if c["acc"] >= floor and not any(_beats(d, c) for d in pool if d is not c)]


def acc_floor(best_acc: float, margin: float, ceiling: float = float("inf")) -> float:
    """The val_acc a kept round must reach under a margin rule: `margin` below the best round, or below `ceiling`
    (the suspect model's val_acc under br_acc_reference suspect) where that is lower."""
    return min(best_acc, ceiling) - margin


def chosen(candidates: list[dict[str, Any]]) -> dict[str, Any]:
    """The kept round; only a margin rule holds more than one candidate, and only it reads their risk."""
    if len(candidates) == 1:
        return candidates[0]
    return min(candidates, key=lambda c: (c["risk"], -c["acc"], -c["round"]))


@register_method("dbr")
def run(ctx: RunContext, cfg: DBRConfig):
    defense = DefenseRun(ctx, cfg)
    data, engine = defense.data, defense.engine
    sd_run, _, sd_split = sd_stages(defense)

    model = defense.backdoor.build_model(ctx.device)
    optimizer = sgd(model.parameters(), cfg.br_lr, cfg.momentum, cfg.weight_decay)
    g = defense.generator("br")
    engine.track({"br": model}, {"br": optimizer}, generators={"br": g})
    # suspect_acc: the val_acc of the model D-BR was given, read before the first round (br_acc_reference suspect)
    carried = engine.keep(candidates=[], best_acc=float("-inf"), suspect_acc=None)
    pools: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    newest: dict[str, Any] = {}  # this round's candidate entry, completed once the round is reported

    def split_pools() -> None:
        for name, code in (("clean", POOL_CLEAN), ("poison", POOL_POISON)):
            idx = pool_indices(sd_split.pools, code)
            pools[name] = data.x_train[idx], data.y_train[idx]
        # only the suspect reference reads it; a resumed run has it from its checkpoint
        if cfg.br_acc_reference == "suspect" and carried.suspect_acc is None:
            x, y = data.clean_set("val")
            carried.suspect_acc = accuracy(predict_logits(model, x, cfg.eval_batch_size).argmax(1), y)

    def poison_pool_fit(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        """The share of the suspected-poisoned pool the model still predicts as its training label: a backdoor
        that survives keeps its poisoned images on their (target) labels after relearning, while unlearned ones
        fall to their own class. Blind: it reads the defender's own pool and the labels it was given (an empty
        pool, where nothing is unlearned, reads 0 in every round)."""
        if not len(y):
            return 0.0
        return (predict_logits(net, x, cfg.eval_batch_size).argmax(1) == y).float().mean().item()

    augment = lambda xb: standard_augment(xb, data.info, g)  # noqa: E731
    wrapped = ctx.wrap_model(model)
    rule = cfg.selection_rule()
    # the metric a margin rule minimises; the other rules read val_acc only, so their candidates carry no risk
    minimised = BR_MARGIN_METRICS.get(rule)

    def ceiling() -> float:
        return carried.suspect_acc if cfg.br_acc_reference == "suspect" else float("inf")

    def br_round(i: int) -> dict[str, float]:
        rnd = i + 1
        set_lr(optimizer, cfg.br_lr * cfg.br_unlearn_lr_scale)
        unlearn = defense.train_epoch(wrapped, optimizer, *pools["poison"], cfg.br_batch_size, g, augment, _ascent)
        set_lr(optimizer, cfg.br_lr)
        for _ in range(cfg.br_relearn_epochs):
            relearn = defense.train_epoch(wrapped, optimizer, *pools["clean"], cfg.br_batch_size, g, augment)
        metrics = {**defense.evaluate(model), "br_poison_pool_fit": poison_pool_fit(model, *pools["poison"])}
        carried.best_acc = max(carried.best_acc, metrics["val_acc"])
        # the candidate holds this round's report (completed below), which the final report repeats if it is kept
        entry = {
            "round": rnd,
            "step": engine.step,
            "acc": metrics["val_acc"],
            "risk": metrics[minimised] if minimised else None,
            "report": metrics,
        }
        carried.candidates = update_candidates(carried.candidates, entry, cfg.br_acc_margin, rule, ceiling())
        metrics.update(
            {
                **sd_split.metrics,
                "br_round": float(rnd),
                "br_unlearn_loss": -unlearn.item(),
                "br_relearn_loss": relearn.item(),
                "br_kept_round": float(chosen(carried.candidates)["round"]),
                "br_acc_floor": acc_floor(carried.best_acc, cfg.br_acc_margin, ceiling()),
            }
        )
        newest["entry"] = entry
        return metrics

    def keep_weights() -> None:
        # copied after the report, which is where a multi-worker context averages the BatchNorm statistics
        newest["entry"]["weights"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    last = engine.run([*sd_run, Stage("br", cfg.br_rounds, br_round, begin=split_pools, after_report=keep_weights)])
    best_acc, floor = carried.best_acc, acc_floor(carried.best_acc, cfg.br_acc_margin, ceiling())
    reference = (
        f"best {best_acc:.4f}"
        if floor == best_acc - cfg.br_acc_margin
        else f"the suspect model's {carried.suspect_acc:.4f}, below the best round's {best_acc:.4f}"
    )
    kept = chosen(carried.candidates)
    model.load_state_dict(kept["weights"])
    ctx.progress(
        f"dbr: kept round {kept['round']} of {cfg.br_rounds} ({rule}): val ACC {kept['acc']:.4f}"
        + (
            ""
            if minimised is None
            else f", the lowest {minimised} ({kept['risk']:.4f}) among the rounds with val ACC >= "
            f"{floor:.4f} ({reference} - margin {cfg.br_acc_margin})"
        )
    )
    return defense.finish(
        model,
        last,
        {**kept["report"], "br_kept_round": float(kept["round"]), "br_acc_floor": floor},
        kept_step=kept["step"],
    )
