"""The constrained tuning objective of a sweep (docs/search-spaces.md#objective), torch-free.

`objective: {metric: val_asr, mode: min, subject_to: {val_acc_drop: 0.02}}` asks for the trial with the best
`metric` among those whose validation ACC is at most 2 points below the reference, the suspect (backdoored) model's
validation ACC. Every report of a defense trial carries

- `val_acc_drop` = reference val ACC - the trial's val ACC (positive: the defense lost accuracy), and
- under a constraint, `val_objective`, the one number Tune's scheduler and searcher see (always minimised):

      s             = metric (mode min) or -metric (mode max)
      v             = sum over constraints of max(0, value - bound)        (0: feasible)
      val_objective = s                              when v == 0
                    = s + INFEASIBLE * (1 + v)       when v > 0
                    = UNSCORED                       when the metric or a constraint is NaN

  With metrics that are fractions (|s| <= 1) every feasible report scores below every infeasible one, infeasible
  ones rank by how far they are from feasibility (to 1/INFEASIBLE of a point), and a NaN report ranks last.

Selection (the sweep's best trial) ranks trials exactly rather than through that scalar: the best metric among the
feasible trials; when none is feasible, the trial with the smallest violation (ties: the better metric), flagged
as infeasible; a trial whose metric or constraint value is NaN never beats one with numbers. Ties go to the
earlier trial (the default point, when the sweep evaluated one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# constraint name -> what it reads, for messages (val_acc_drop reads accuracies only: blind in methods' knowledge)
CONSTRAINTS = {"val_acc_drop": "the reference validation ACC minus the trial's val_acc"}
OBJECTIVE_METRIC = "val_objective"  # the scalar Tune sees under a constraint (mode min)
INFEASIBLE = 1000.0  # offset and slope of the penalty of an infeasible report
UNSCORED = 1.0e9  # a report whose metric or constraint value is NaN
TOLERANCE = 1e-9  # 0.97 - 0.95 is 0.020000000000000018 in floats, and meets a bound of 0.02
# the default objective of a defense space that names none: the bar a defense is held to (low ASR at <= 2 points
# of ACC lost)
DEFAULT_DEFENSE_OBJECTIVE = {"metric": "val_asr", "mode": "min", "subject_to": {"val_acc_drop": 0.02}}


def _value(metrics: dict[str, Any], key: str) -> float:
    value = metrics.get(key, math.nan)
    try:
        return math.nan if value is None else float(value)
    except (TypeError, ValueError):
        return math.nan


def violation(metrics: dict[str, Any], constraints: dict[str, float]) -> float:
    """How far `metrics` are from meeting every constraint (0: they meet them all); NaN when one is NaN/missing."""
    total = 0.0
    for name, bound in constraints.items():
        value = _value(metrics, name)
        if math.isnan(value):
            return math.nan
        excess = value - bound
        total += excess if excess > TOLERANCE else 0.0
    return total


def oriented(value: float, mode: str) -> float:
    """`value` as lower-is-better."""
    return value if mode == "min" else -value


def objective_value(metrics: dict[str, Any], metric: str, mode: str, constraints: dict[str, float]) -> float:
    """The scalar Tune sees (module docstring)."""
    value, v = _value(metrics, metric), violation(metrics, constraints)
    if math.isnan(value) or math.isnan(v):
        return UNSCORED
    s = oriented(value, mode)
    return s if v == 0 else s + INFEASIBLE * (1.0 + v)


@dataclass
class TrialObjective:
    """The metrics a defense trial adds to each report (TrackedContext.derive): val_acc_drop from the reference
    ACC, and val_objective when the sweep has constraints. A report without the metric or a constraint's inputs (a
    step that evaluates nothing) gets no val_objective, which Tune's schedulers skip."""

    reference_acc: float | None
    metric: str
    mode: str
    constraints: dict[str, float] = field(default_factory=dict)

    def __call__(self, metrics: dict[str, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.reference_acc is not None and "val_acc" in metrics:
            out["val_acc_drop"] = float(self.reference_acc) - float(metrics["val_acc"])
        if self.constraints:
            seen = {**metrics, **out}
            if self.metric in seen and all(name in seen for name in self.constraints):
                out[OBJECTIVE_METRIC] = objective_value(seen, self.metric, self.mode, self.constraints)
        return out


def rank(trial: dict[str, Any], metric: str, mode: str, constraints: dict[str, float]) -> tuple | None:
    """A trial's selection key, lower is better; None when its metric is NaN (never selected)."""
    value = _value(trial, metric)
    if trial.get("error") or math.isnan(value):
        return None
    s = oriented(value, mode)
    if not constraints:
        return (0, 0.0, s)
    v = violation(trial, constraints)
    if math.isnan(v):
        return (2, 0.0, s)  # a constraint value is NaN: below every trial with numbers
    return (0, 0.0, s) if v == 0 else (1, v, s)


def select(
    trials: list[dict[str, Any]], metric: str, mode: str, constraints: dict[str, float] | None = None
) -> tuple[dict[str, Any] | None, bool]:
    """(the selected trial, whether it meets every constraint); (None, False) when no trial reported `metric`."""
    constraints = constraints or {}
    ranked = [(key, i, t) for i, t in enumerate(trials) if (key := rank(t, metric, mode, constraints)) is not None]
    if not ranked:
        return None, False
    key, _, best = min(ranked, key=lambda r: (r[0], r[1]))
    return best, key[0] == 0


def describe(metric: str, mode: str, constraints: dict[str, float]) -> str:
    """`min val_asr subject to val_acc_drop <= 0.02`, for tags and messages."""
    text = f"{mode} {metric}"
    if constraints:
        text += " subject to " + ", ".join(f"{name} <= {bound:g}" for name, bound in constraints.items())
    return text
