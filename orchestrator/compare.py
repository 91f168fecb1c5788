"""A study with `blind_vs_oracle` (docs/studies.md#blind-vs-oracle): how far a defense tuned without knowing the
attack lands from one tuned with the attacker's trigger.

Each attack x defense cell is tuned twice on the tuning seed: under knowledge oracle on the space's objective
(val ASR subject to at most 2 points of val ACC lost by default: it reads the trigger) and under knowledge blind
on a blind objective (val_blind_score by default, under the space's accuracy constraint, which is blind). Three
configurations are then rerun on every evaluation seed: the preset (no tuning, blind in-method rules, which is what
a defender runs), the blind-tuned and the oracle-tuned one. A defense
whose config has no knowledge-dependent rule (DefenseConfig.KNOWLEDGE_RULES) trains the same under both levels, so
its cell runs one sweep and selects twice from the same trials; a configuration chosen by more than one variant is
rerun once and counted for each (the final run's `variants` tag; `selected_trial_id.<variant>` names the trial
each tuned variant selected).

Over the trials of each blind sweep, the Spearman rank correlation of every blind signal with the true validation
ASR says how well that signal stands in for the trigger there. Tuning objectives read validation metrics only;
the test figures of the final runs are what the table compares.
"""

from __future__ import annotations

import json
import math
from typing import Any

from methods.core.knowledge import BLIND, ORACLE
from orchestrator.resolve import METHODS
from orchestrator.spaces import final_spec
from orchestrator.tables import format_rows, in_order, mean_std

COMPARE_MODE = "blind-vs-oracle"  # the study run's `mode` tag, by which bdo report renders this table
VARIANTS = ("preset", "blind", "oracle")
VARIANT_TITLES = {"preset": "preset", "blind": "blind-tuned", "oracle": "oracle-tuned"}
# blind signals correlated with val ASR over a blind sweep's trials, in the table's order; canary ASR only where
# the runs planted a canary
SIGNALS = ("val_adv_concentration", "val_blind_score", "val_acc", "val_canary_asr")
SIGNAL_TITLES = {
    "val_adv_concentration": "adv. concentration",
    "val_blind_score": "blind score",
    "val_acc": "val ACC",
    "val_canary_asr": "canary ASR",
}
# the goal (docs/studies.md#blind-vs-oracle): blind-tuned at most this much worse than oracle-tuned on test
ASR_SLACK, ACC_SLACK = 0.05, 0.02


def run_comparison(session, study, pool, study_run_id: str, max_failures: int) -> int:
    """Tune and rerun every cell (module docstring); returns how many runs failed."""
    from orchestrator.runner import best_trial, run_sweep

    tags = {"study_run_id": study_run_id}
    failed = 0
    finals: list[Any] = []
    for ai, (attack, _) in enumerate(study.attacks):
        for di, (defense, _) in enumerate(study.defenses):
            blind_plan, oracle_plan = study.blind_sweeps[(ai, di)], study.sweeps[(ai, di)]
            shared = not METHODS.get(defense).config_cls.KNOWLEDGE_RULES
            sweeps = {}
            for level, plan in ((BLIND, blind_plan), (ORACLE, oracle_plan)):
                if level == ORACLE and shared:
                    sweeps[ORACLE] = sweeps[BLIND]
                    continue
                selects = f"{BLIND},{ORACLE}" if shared else level
                result = run_sweep(
                    session,
                    plan,
                    extra_tags={**tags, "variants": selects},
                    parent_id=study_run_id,
                    max_failures=max_failures,
                )
                failed += result.failed
                sweeps[level] = result
            picks: dict[str, tuple[Any, dict[str, Any], dict[str, str]]] = {"preset": (blind_plan, {}, {})}
            for level, plan in ((BLIND, blind_plan), (ORACLE, oracle_plan)):
                best = best_trial(sweeps[level].trials, plan.space.metric, plan.space.mode, plan.constraints)
                if best is None:
                    print(f"  {attack} x {defense}: no {level} trial reported {plan.space.metric}")
                    failed += 1
                    continue
                # named by variant: a run two variants chose carries both selections
                picks[level] = (
                    plan,
                    dict(best["config"]),
                    {
                        f"sweep_run_id.{level}": sweeps[level].sweep_run_id,
                        f"selected_trial_id.{level}": best["trial_id"],
                    },
                )
            for variants, (plan, chosen, chosen_tags) in distinct_configs(study, picks, attack, defense, shared):
                for seed in study.seeds:
                    spec = final_spec(plan, study.dataset, study.model, defense, attack, seed, chosen)
                    finals.append(
                        pool.submit(
                            f"{attack} x {defense} ({'/'.join(variants)}) seed {seed}",
                            "final",
                            spec,
                            {**tags, **chosen_tags, "knowledge": plan.knowledge, "variants": ",".join(variants)},
                            plan,
                            parent_id=study_run_id,
                        )
                    )
    for job in finals:
        failed += pool.wait(job) is None
    return failed


def distinct_configs(
    study, picks: dict[str, tuple[Any, dict[str, Any], dict[str, str]]], attack: str, defense: str, shared: bool
) -> list[tuple[list[str], tuple[Any, dict[str, Any], dict[str, str]]]]:
    """The variants grouped by the run they stand for: the same resolved config (and, for a defense with
    knowledge rules, the same level) is one run counted for every variant that chose it, tagged with the sweep
    and trial of each tuned variant among them."""
    groups: dict[str, tuple[list[str], tuple[Any, dict[str, Any], dict[str, str]]]] = {}
    for variant in VARIANTS:
        if variant not in picks:
            continue
        plan, chosen, chosen_tags = picks[variant]
        config = dict(final_spec(plan, study.dataset, study.model, defense, attack, study.seeds[0], chosen).config)
        if shared:
            config.pop("knowledge", None)
        key = json.dumps(config, sort_keys=True, default=str)
        if key in groups:
            groups[key][0].append(variant)
            groups[key][1][2].update(chosen_tags)
        else:
            groups[key] = ([variant], (plan, chosen, dict(chosen_tags)))
    return list(groups.values())


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation of the pairs where both are finite (ties take their mean rank); NaN under three
    pairs or when either side is constant."""
    pairs = [(x, y) for x, y in zip(xs, ys) if not (math.isnan(x) or math.isnan(y))]
    if len(pairs) < 3:
        return math.nan

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in order[i : j + 1]:
                out[k] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def collect_comparison(tracker, study_run_id: str) -> dict[str, Any]:
    """Everything the comparison table shows, read back from MLflow: per (attack, defense) the final runs of each
    variant (test ACC / ASR per seed), the trials of its sweeps and the rank correlations over its blind sweep."""
    study_tags = tracker.client.get_run(study_run_id).data.tags
    layout = json.loads(study_tags.get("layout", "{}"))
    cells: dict[tuple[str, str], dict[str, Any]] = {}

    def cell(attack: str, defense: str) -> dict[str, Any]:
        return cells.setdefault((attack, defense), {"runs": {v: [] for v in VARIANTS}, "trials": 0, "rho": {}})

    for run in tracker.search(f"tags.study_run_id = '{study_run_id}' and tags.role = 'final'"):
        tags = run.data.tags
        for variant in tags.get("variants", "").split(","):
            if variant in VARIANTS:
                cell(tags["attack"], tags["method"])["runs"][variant].append(
                    (
                        run.data.params.get("attack.seed", ""),
                        run.info.run_id,
                        {m: run.data.metrics.get(f"test_{m}", math.nan) for m in ("acc", "asr")},
                    )
                )
    for sweep in tracker.search(f"tags.study_run_id = '{study_run_id}' and tags.role = 'sweep'"):
        tags = sweep.data.tags
        trials = [t.data.metrics for t in tracker.children(sweep.info.run_id)]
        entry = cell(tags["attack"], tags["method"])
        entry["trials"] += len(trials)
        if BLIND in tags.get("variants", "").split(","):
            asr = [t.get("val_asr", math.nan) for t in trials]
            entry["rho"] = {
                s: spearman([t.get(s, math.nan) for t in trials], asr) for s in SIGNALS if any(s in t for t in trials)
            }
    attacks = in_order({a for a, _ in cells}, layout.get("attacks", []))
    defenses = in_order({d for _, d in cells}, layout.get("defenses", []))
    return {
        "attacks": attacks,
        "defenses": defenses,
        "cells": cells,
        "objective": study_tags.get("blind_objective", ""),
    }


def summarize_cell(entry: dict[str, Any]) -> dict[str, Any]:
    """Mean and std over seeds of each variant's test ACC and ASR, and blind minus oracle."""
    out: dict[str, Any] = {}
    for variant, runs in entry["runs"].items():
        out[variant] = {m: mean_std([values[m] for _, _, values in runs]) for m in ("acc", "asr")}
        out[variant]["seeds"] = len(runs)
    blind, oracle = out["blind"], out["oracle"]
    out["gap_asr"] = blind["asr"][0] - oracle["asr"][0]
    out["gap_acc"] = blind["acc"][0] - oracle["acc"][0]
    out["holds"] = out["gap_asr"] <= ASR_SLACK and out["gap_acc"] >= -ACC_SLACK
    return out


def render_comparison(collected: dict[str, Any], fmt: str) -> str:
    cells = collected["cells"]
    signals = [s for s in SIGNALS if any(s in c["rho"] for c in cells.values())]
    if fmt == "runs-csv":
        header = ["attack", "defense", "variant", "seed", "run_id", "test_acc", "test_asr"]
        rows = [
            [a, d, v, seed, run_id, values["acc"], values["asr"]]
            for (a, d), c in sorted(cells.items())
            for v in VARIANTS
            for seed, run_id, values in c["runs"][v]
        ]
        return format_rows(header, rows, "", "csv")

    def pct(pair: tuple[float, float]) -> str:
        return "-" if math.isnan(pair[0]) else f"{100 * pair[0]:.1f}±{100 * pair[1]:.1f}"

    def points(value: float) -> str:
        return "-" if math.isnan(value) else f"{100 * value:+.1f}"

    header = (
        ["attack", "defense"]
        + [VARIANT_TITLES[v] for v in VARIANTS]
        + ["ASR blind - oracle", "ACC blind - oracle", "within goal"]
        + [f"rho({SIGNAL_TITLES[s]}, val ASR)" for s in signals]
        + ["trials"]
    )
    rows = []
    per_defense: dict[str, list[bool]] = {}
    for attack in collected["attacks"]:
        for defense in collected["defenses"]:
            entry = cells.get((attack, defense))
            if entry is None:
                continue
            summary = summarize_cell(entry)
            per_defense.setdefault(defense, []).append(summary["holds"])
            rows.append(
                [attack, defense]
                + [f"{pct(summary[v]['acc'])} / {pct(summary[v]['asr'])}" for v in VARIANTS]
                + [points(summary["gap_asr"]), points(summary["gap_acc"]), "yes" if summary["holds"] else "no"]
                + ["-" if math.isnan(entry["rho"].get(s, math.nan)) else f"{entry['rho'][s]:+.2f}" for s in signals]
                + [str(entry["trials"])]
            )
    holding = [d for d, marks in per_defense.items() if all(marks)]
    caption = (
        f"cells: test ACC / ASR in %, mean±std over seeds; blind sweeps select on {collected['objective']}; "
        f"goal: blind ASR at most {100 * ASR_SLACK:.0f} points above oracle and ACC at most "
        f"{100 * ACC_SLACK:.0f} below; rho: Spearman over the blind sweep's trials. "
        f"Defenses within the goal on every attack: {len(holding)} of {len(per_defense)}"
        + (f" ({', '.join(holding)})" if holding else "")
    )
    return format_rows(header, rows, caption, fmt)


def comparison_table(tracker, study_run_id: str, fmt: str) -> str:
    return render_comparison(collect_comparison(tracker, study_run_id), fmt)
