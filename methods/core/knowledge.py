"""What a defender must know to compute each metric (docs/methods.md#metrics), torch-free so that validation
can refuse an objective before anything starts.

- `oracle`: the metric reads the attacker's trigger (ASR, RA, DER and what is built on them) or the true poison
  flags of the training set (split precision/recall, AUROCs against the flags, poisoned fractions). No defender
  has either, so a threshold chosen on it is tuned with knowledge the defense will never have.
- `blind`: computable from what a defender holds: the suspect model, the training set it came from, and the
  clean held-out data its setting allows. The validation split counts as such clean data: it is drawn from the
  clean distribution before poisoning and never poisoned, which is what a defender's small trusted hold-out is.

A metric is named by its bare name (`acc`) or with its split (`val_acc`, `test_acc`); the split prefix never
changes the knowledge level. A name in neither table is oracle, the safe side: a new metric must be added here
before a blind sweep may select on it.
"""

from __future__ import annotations

ORACLE, BLIND = "oracle", "blind"
KNOWLEDGE_LEVELS = (ORACLE, BLIND)

SPLIT_PREFIXES = ("val_", "test_")

# Metrics that read the trigger or the true poison flags.
ORACLE_METRICS = frozenset(
    {
        "asr",
        "ra",
        "der",
        "implant",  # the trigger applied to evaluation images
        "fct_auroc",  # SD's FCT score separating clean from triggered validation images
        "split_poison_precision",
        "split_poison_recall",
        "split_clean_precision",
        "split_clean_recall",
        "split_auroc",
        "pool_clean_poisoned_frac",
        "pbe_next_poisoned_frac",  # poisoned fractions of a pool, from the flags
        "pbe_step0_failed",  # PBE's step-0 check against val ASR
        "poison_count",
        "wanet_noise_count",  # the attacker's own counts of the images it altered
        "poison_class_fraction",  # a clean-label attack's share of the target class it poisoned
        "papers_regime",  # 1 when the attack's configuration lies in the range its papers evaluated
        "cl_hardened_clean_acc",  # a clean model on CL's hardened images: the attacker's construction
    }
)

# Metrics a defender can compute; the counters and losses describe the run itself, not the attack. Counters of
# in-method choices (kept_step, br_kept_round, pbe_attempt) follow the run's own rules, which under blind
# knowledge read only blind metrics.
BLIND_METRICS = frozenset(
    {
        "acc",  # clean held-out data (see above)
        # methods/core/blind_signals.py: PGD examples of clean held-out images, and the ASR of the defender's own
        # canary backdoor, measured with the canary trigger the defender chose (never the attacker's)
        "adv_concentration",
        "canary_asr",
        # methods/core/blind_signals.py: the training labels a model no longer predicts beyond its clean error
        "label_excess",
        # acc - adv_concentration (methods/defenses/shared/common.py): blind, as both of its terms are; the blind
        # analogue of ACC - ASR that a blind sweep can maximise
        "blind_score",
        # the reference val ACC (the suspect model's own) minus a trial's: accuracy only, the tuning constraint
        "acc_drop",
        "pool_clean_size",
        "pool_poison_size",  # how many samples the defense put in each pool: its own decision
        "train_loss",
        "lr",
        "stage",
        "adversarial",
        "asd_stage",
        "kept_step",
        "pbe_step",
        "pbe_attempt",
        "pbe_step0_canary_failed",  # PBE's step-0 check against the canary's ASR: the defender's own backdoor
        # PBE's step-0 check against the label excess (a blind signal, methods/core/blind_signals.py)
        "pbe_step0_label_excess_failed",
        # D-BR's round counters and the accuracy floor of its selection rule, from val ACC
        "br_round",
        "br_kept_round",
        "br_acc_floor",
        "br_unlearn_loss",
        "br_relearn_loss",
        # the share of D-BR's own suspected-poisoned pool still predicted as its training label
        "br_poison_pool_fit",
        "sd_loss",
        "st_supcon_loss",
        "st_cls_loss",
        "train_lx",
        "train_lu",
        "loss_ce",
        "loss_at",
        "loss_vert",
        "loss_edge",
        "loss_trans",
    }
)


def bare_name(metric: str) -> str:
    """`val_acc` -> `acc`: the metric without its evaluation split."""
    for prefix in SPLIT_PREFIXES:
        if metric.startswith(prefix):
            return metric[len(prefix) :]
    return metric


def classified(metric: str) -> bool:
    """Whether the metric's level is stated in a table (and not just the unknown-name default)."""
    name = bare_name(metric)
    return name in ORACLE_METRICS or name in BLIND_METRICS


def knowledge_of(metric: str) -> str:
    """`blind` when a defender can compute the metric, else `oracle` (unknown names included)."""
    return BLIND if bare_name(metric) in BLIND_METRICS else ORACLE


def blind_metrics(split: str = "val") -> list[str]:
    """The blind metrics of an evaluation split that every defense reports, for messages (`canary_asr` only when a
    canary is planted)."""
    return [
        f"{split}_acc",
        f"{split}_adv_concentration",
        f"{split}_label_excess",
        f"{split}_blind_score",
        f"{split}_canary_asr",
    ]
