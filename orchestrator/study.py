"""`bdo study STUDY.yaml` (docs/studies.md): attacks x defenses x seeds on one dataset and model. Each defense is
tuned against each attack on validation metrics (a sweep, child of the study run); its selected configuration
is then rerun on every seed (final runs, each on the attack trained with that seed)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import BadInput
from orchestrator.report import mean_std
from orchestrator.resolve import SEARCH_SPACES, load_yaml, method_spec, resolve_run
from orchestrator.runner import Session, run_single, run_sweep
from orchestrator.spaces import SweepPlan, load_space, plan_sweep

STUDY_KEYS = {"name", "dataset", "model", "attacks", "defenses", "seeds", "tune", "data", "quick"}
TUNE_KEYS = {"num_samples", "searcher", "scheduler", "max_concurrent", "seed"}


@dataclass
class StudyPlan:
    path: Path
    name: str
    dataset: str
    model: str
    attacks: list[tuple[str, dict[str, Any]]]
    defenses: list[tuple[str, Path]]
    seeds: list[int]
    tune: dict[str, Any]
    sweeps: dict[tuple[int, int], SweepPlan] = field(default_factory=dict)


def _given(flag: Any, from_study: Any) -> Any:
    """A command-line value wins over the study file's, even when it is 0 (which plan_sweep then refuses)."""
    return flag if flag is not None else from_study


def load_study(path: Path, args) -> StudyPlan:
    raw = load_yaml(path, "study")
    src = str(path)
    if not isinstance(raw, dict):
        raise BadInput(f"{src}: a study is a mapping with attacks, defenses and seeds")
    unknown = sorted(set(raw) - STUDY_KEYS)
    if unknown:
        raise BadInput(f"{src}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(STUDY_KEYS))}")
    for key in ("attacks", "defenses", "seeds"):
        if not isinstance(raw.get(key), list) or not raw[key]:
            raise BadInput(f"{src}: {key}: a non-empty list is required")
    attacks = []
    for item in raw["attacks"]:
        values = {"name": item} if isinstance(item, str) else dict(item)
        name = str(values.pop("name", ""))
        method_spec(name, "attack", f"{src}: attacks")
        attacks.append((name, values))
    defenses = []
    for item in raw["defenses"]:
        values = {"name": item} if isinstance(item, str) else dict(item)
        name = str(values.get("name", ""))
        method_spec(name, "defense", f"{src}: defenses")
        given = values.get("space")
        # a study's own space path is relative to the study file, so a study folder works from anywhere
        space = ((path.parent / given).resolve() if given and not Path(given).is_absolute()
                 else Path(given or SEARCH_SPACES / f"{name}.yaml"))
        if not space.is_file():
            raise BadInput(f"{src}: defenses: {name}: space {given} not found (paths are relative to the study file)")
        defenses.append((name, space))
    seeds = raw["seeds"]
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise BadInput(f"{src}: seeds: non-negative integers")
    tune = raw.get("tune") or {}
    if not isinstance(tune, dict) or set(tune) - TUNE_KEYS:
        raise BadInput(f"{src}: tune: allowed keys {', '.join(sorted(TUNE_KEYS))}")
    plan = StudyPlan(path, str(raw.get("name", path.stem)), args.dataset or str(raw.get("dataset", "digits")),
                     args.model or str(raw.get("model", "small_cnn")), attacks, defenses, list(seeds), dict(tune))
    quick = bool(raw.get("quick", False)) or bool(getattr(args, "quick", False))
    from orchestrator.resolve import parse_set

    sets = parse_set(args.set)
    from orchestrator.resolve import resolve_attack_config

    for attack, attack_values in attacks:  # the study's own attack values are checked against the study file
        resolve_attack_config(attack, plan.dataset, plan.model, seeds[0], attack_values, not args.no_preset,
                              f"{src}: attacks: {attack}")
    for ai, (attack, attack_values) in enumerate(attacks):
        for di, (defense, space_path) in enumerate(defenses):
            space = load_space(space_path)
            if space.method != defense:
                raise BadInput(f"{src}: defenses: {space_path} is a space for {space.method}, not {defense}")
            space.attack_values = {**space.attack_values, **attack_values}
            space.data_values = {**space.data_values, **(raw.get("data") or {})}
            plan.sweeps[(ai, di)] = plan_sweep(
                space, dataset=plan.dataset, model=plan.model,
                seed=args.seed if args.seed is not None else tune.get("seed", seeds[0]), attack=attack,
                sets=sets, use_preset=not args.no_preset, quick=quick,
                searcher=args.searcher or tune.get("searcher"), scheduler=args.scheduler or tune.get("scheduler"),
                objective=args.objective,
                num_samples=_given(args.num_samples, tune.get("num_samples")),
                max_concurrent=_given(args.max_concurrent, tune.get("max_concurrent")),
                cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                workers_per_trial=args.workers_per_trial,
                default_trial=not getattr(args, "no_default_trial", False),
            )
    return plan


@dataclass
class StudyOutcome:
    study_run_id: str
    table: str
    failed: int


def run_study(session: Session, study: StudyPlan, args) -> StudyOutcome:
    from orchestrator.devices import driver_device
    from orchestrator.execute import build_attack

    tracker = session.open_tracker()
    study_run_id = tracker.start_run(f"study-{study.name}", {"role": "study", "dataset": study.dataset,
                                                            "model": study.model, "study_file": str(study.path)})
    tracker.log_params(study_run_id, {"attacks": [a for a, _ in study.attacks],
                                      "defenses": [d for d, _ in study.defenses],
                                      "seeds": study.seeds, **{f"tune.{k}": v for k, v in study.tune.items()}})
    tags = {"study_run_id": study_run_id}
    failed = 0
    cells: dict[tuple[str, str], list[dict[str, float]]] = {}
    no_defense: dict[str, list[str]] = {}
    trials: dict[tuple[str, str], int] = {}
    try:
        for ai, (attack, _) in enumerate(study.attacks):
            for seed in study.seeds:  # the "no defense" column: the attack itself, per seed
                first = study.sweeps[(ai, 0)]
                seeded = resolve_run(first.base.method, study.dataset, study.model, seed, attack,
                                     attack_base={k: v for k, v in first.base.attack_config.items()
                                                  if k not in ("seed",)},
                                     data_base=first.base.data_config, use_preset=False)
                backdoor, attack_run_id, _ = build_attack(seeded, tracker, session.storage, session.data_root,
                                                          session.download, extra_tags=tags,
                                                          device=driver_device(first))
                cells.setdefault((attack, "none"), []).append(backdoor.metrics)
                no_defense.setdefault(attack, []).append(attack_run_id)
            # bdo report reads the column from these ids, not from the study_run_id tag: a cached attack keeps the
            # tags of whichever command built it, and the sweeps' own attacks (tuning seed, a space's data block)
            # carry this study's tag without belonging to the column.
            tracker.set_tags(study_run_id, {"no_defense_run_ids": json.dumps(no_defense)})
            for di, (defense, _) in enumerate(study.defenses):
                plan = study.sweeps[(ai, di)]
                result = run_sweep(session, plan, extra_tags=tags, parent_id=study_run_id,
                                   max_failures=args.max_failures)
                failed += result.failed
                trials[(attack, defense)] = len(result.trials)
                if result.best is None:
                    failed += 1
                    continue
                chosen = {k: v for k, v in result.best["config"].items()}
                for seed in study.seeds:
                    spec = resolve_run(defense, study.dataset, study.model, seed, attack,
                                       base={**{k: v for k, v in plan.base.config.items() if k != "seed"}, **chosen},
                                       attack_base={k: v for k, v in plan.base.attack_config.items() if k != "seed"},
                                       data_base=plan.base.data_config, use_preset=False)
                    spec.config = _with_derived(plan, spec.config)
                    _, metrics = run_single(session, spec, extra_tags={**tags, "sweep_run_id": result.sweep_run_id,
                                                                       "selected_trial_id": result.best["trial_id"]},
                                            role="final", parent_id=study_run_id, device=driver_device(plan))
                    cells.setdefault((attack, defense), []).append(metrics)
    except BaseException:
        tracker.end(study_run_id, "FAILED")
        raise
    table = format_table(study, cells, trials)
    tracker.end(study_run_id, "FINISHED" if not failed else "FAILED")
    return StudyOutcome(study_run_id, table, failed)


def _with_derived(plan: SweepPlan, values: dict[str, Any]) -> dict[str, Any]:
    from orchestrator.spaces import apply_derived

    return apply_derived(plan.space, values)


def format_table(study: StudyPlan, cells: dict[tuple[str, str], list[dict[str, float]]],
                 trials: dict[tuple[str, str], int]) -> str:
    """The study's table from the metrics it holds in memory, drawn by the same renderer as `bdo report` (which
    reads them back from MLflow), so the two can be compared cell by cell."""
    from orchestrator.report import render

    columns = ["no defense"] + [d for d, _ in study.defenses]
    summary = {}
    for (attack, column), runs in cells.items():
        name = "no defense" if column == "none" else column
        summary[(attack, name)] = {"seeds": len(runs), "trials": trials.get((attack, column), 0),
                                   **{m: mean_std([r.get(f"test_{m}", math.nan) for r in runs])
                                      for m in ("acc", "asr")}}
    return render([a for a, _ in study.attacks], columns, summary, ["acc", "asr"], "md")
