"""`bdo study STUDY.yaml` (docs/studies.md): attacks x defenses x seeds on one dataset and model. Each defense is
tuned against each attack on validation metrics (a sweep, child of the study run); its selected configuration
is then rerun on every seed (final runs, each on the attack trained with that seed)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from methods.core.knowledge import BLIND, ORACLE, blind_metrics, knowledge_of
from orchestrator.compare import COMPARE_MODE, comparison_table, run_comparison
from orchestrator.errors import BadInput
from orchestrator.placement import RunPool
from orchestrator.resolve import SEARCH_SPACES, load_yaml, method_spec, resolve_run
from orchestrator.runner import run_sweep
from orchestrator.session import Session
from orchestrator.spaces import SweepPlan, final_spec, load_space, plan_sweep
from orchestrator.tables import ATTACK_COLUMNS, PAPERS_REGIME, mean_std, outside_papers, render

STUDY_KEYS = {
    "name",
    "dataset",
    "model",
    "attacks",
    "defenses",
    "seeds",
    "tune",
    "data",
    "quick",
    "clean",
    "jobs",
    "blind_vs_oracle",
    "recipe",
}
TUNE_KEYS = {"num_samples", "searcher", "scheduler", "max_concurrent", "seed"}
DEFENSE_KEYS = {"name", "space", "tune"}
DEFAULT_BLIND_OBJECTIVE = ("val_blind_score", "max")


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
    # defenses (by index) run on their presets without a sweep (`num_samples: 0`): the untuned configuration
    untuned: set[int] = field(default_factory=set)
    clean: bool = False  # a "clean model" column: each attack's settings with nothing poisoned
    jobs: int = 1  # runs trained at once (attack builds and final runs; sweeps use Ray's own parallelism)
    # blind_vs_oracle (orchestrator/compare.py): every cell is also tuned under knowledge blind, on this objective;
    # `sweeps` then holds the oracle sweeps
    blind_objective: tuple[str, str] | None = None
    blind_sweeps: dict[tuple[int, int], SweepPlan] = field(default_factory=dict)
    recipe: str | None = None  # a named recipe of the dataset's presets (--recipe overrides the study's)


def _given(flag: Any, from_study: Any) -> Any:
    """A command-line value wins over the study file's, even when it is 0 (which plan_sweep then refuses)."""
    return flag if flag is not None else from_study


def _study_attacks(items: list, src: str) -> list[tuple[str, dict[str, Any]]]:
    attacks = []
    for item in items:
        values = {"name": item} if isinstance(item, str) else dict(item)
        name = str(values.pop("name", ""))
        method_spec(name, "attack", f"{src}: attacks")
        attacks.append((name, values))
    return attacks


def _study_defenses(items: list, src: str, path: Path) -> tuple[list[tuple[str, Path]], list[dict[str, Any]]]:
    """Each defense with its space file, and its own tune block."""
    defenses, tunes = [], []
    for item in items:
        values = {"name": item} if isinstance(item, str) else dict(item)
        name = str(values.get("name", ""))
        method_spec(name, "defense", f"{src}: defenses")
        if set(values) - DEFENSE_KEYS:
            raise BadInput(
                f"{src}: defenses: {name}: unknown key(s) {', '.join(sorted(set(values) - DEFENSE_KEYS))}; "
                f"allowed: {', '.join(sorted(DEFENSE_KEYS))}"
            )
        tunes.append(_tune_block(values.get("tune") or {}, f"{src}: defenses: {name}: tune"))
        given = values.get("space")
        # a study's own space path is relative to the study file, so a study folder works from anywhere
        space = (
            (path.parent / given).resolve()
            if given and not Path(given).is_absolute()
            else Path(given or SEARCH_SPACES / f"{name}.yaml")
        )
        if not space.is_file():
            raise BadInput(f"{src}: defenses: {name}: space {given} not found (paths are relative to the study file)")
        defenses.append((name, space))
    return defenses, tunes


def _study_seeds(seeds: list, src: str) -> list[int]:
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise BadInput(f"{src}: seeds: non-negative integers")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:  # a repeated seed reruns the same run and would count as another sample in mean±std
        raise BadInput(f"{src}: seeds: {', '.join(map(str, repeated))} listed more than once; list each seed once")
    return seeds


def _study_mapping(path: Path) -> dict[str, Any]:
    """The study file's top level: known keys, and the three lists every study needs."""
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
    return raw


def load_study(path: Path, args) -> StudyPlan:
    raw = _study_mapping(path)
    src = str(path)
    attacks = _study_attacks(raw["attacks"], src)
    defenses, defense_tunes = _study_defenses(raw["defenses"], src, path)
    seeds = _study_seeds(raw["seeds"], src)
    tune = _tune_block(raw.get("tune") or {}, f"{src}: tune")
    jobs = _given(getattr(args, "jobs", None), raw.get("jobs", 1))
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise BadInput(f"{src}: jobs: a positive integer (runs trained at once), not {jobs!r}")
    if not isinstance(raw.get("clean", False), bool):
        raise BadInput(f"{src}: clean: true or false (a clean-model column trained with nothing poisoned)")
    plan = StudyPlan(
        path,
        str(raw.get("name", path.stem)),
        args.dataset or str(raw.get("dataset", "digits")),
        args.model or str(raw.get("model", "small_cnn")),
        attacks,
        defenses,
        list(seeds),
        dict(tune),
        clean=raw.get("clean", False),
        jobs=jobs,
        recipe=getattr(args, "recipe", None) or (str(raw["recipe"]) if raw.get("recipe") else None),
    )
    plan.blind_objective = blind_objective(raw.get("blind_vs_oracle"), src, args)
    quick = bool(raw.get("quick", False)) or bool(getattr(args, "quick", False))
    from orchestrator.resolve import parse_set

    sets = parse_set(args.set)
    from orchestrator.resolve import resolve_attack_config

    for attack, attack_values in attacks:  # the study's own attack values are checked against the study file
        resolve_attack_config(
            attack,
            plan.dataset,
            plan.model,
            seeds[0],
            attack_values,
            not args.no_preset,
            f"{src}: attacks: {attack}",
            recipe=plan.recipe,
        )
    for di, defense_tune in enumerate(defense_tunes):
        if _given(args.num_samples, {**tune, **defense_tune}.get("num_samples")) == 0:
            plan.untuned.add(di)
    if plan.blind_objective and plan.untuned:
        raise BadInput(
            f"{src}: blind_vs_oracle tunes every defense; num_samples 0 (no sweep) leaves nothing to "
            f"compare for {', '.join(defenses[i][0] for i in sorted(plan.untuned))}"
        )
    for ai, (attack, attack_values) in enumerate(attacks):
        for di, (defense, space_path) in enumerate(defenses):
            space = load_space(space_path)
            if space.method != defense:
                raise BadInput(f"{src}: defenses: {space_path} is a space for {space.method}, not {defense}")
            space.attack_values = {**space.attack_values, **attack_values}
            space.data_values = {**space.data_values, **(raw.get("data") or {})}
            cell_tune = {**tune, **defense_tunes[di]}
            planned = partial(
                plan_sweep,
                dataset=plan.dataset,
                model=plan.model,
                seed=args.seed if args.seed is not None else cell_tune.get("seed", seeds[0]),
                attack=attack,
                sets=sets,
                use_preset=not args.no_preset,
                quick=quick,
                searcher=args.searcher or cell_tune.get("searcher"),
                # a comparison selects twice from one set of trials, which early stopping on one objective would
                # cut short for the other: FIFO unless the study asks otherwise (and is then refused)
                scheduler=args.scheduler or cell_tune.get("scheduler") or ("fifo" if plan.blind_objective else None),
                objective=args.objective,
                # an untuned defense is still planned (so its space and presets are checked), never swept
                num_samples=1 if di in plan.untuned else _given(args.num_samples, cell_tune.get("num_samples")),
                max_concurrent=_given(args.max_concurrent, cell_tune.get("max_concurrent")),
                cpus_per_trial=args.cpus_per_trial,
                gpus_per_trial=args.gpus_per_trial,
                workers_per_trial=args.workers_per_trial,
                default_trial=not getattr(args, "no_default_trial", False),
                recipe=plan.recipe,
            )
            if plan.blind_objective is None:
                plan.sweeps[(ai, di)] = planned(space, knowledge=getattr(args, "knowledge", None))
                continue
            metric, mode = plan.blind_objective
            plan.sweeps[(ai, di)] = planned(space, knowledge=ORACLE)
            plan.blind_sweeps[(ai, di)] = planned(replace(space, metric=metric, mode=mode), knowledge=BLIND)
            for sweep in (plan.sweeps[(ai, di)], plan.blind_sweeps[(ai, di)]):
                check_comparable(sweep, src)
    return plan


def blind_objective(value: Any, source: str, args) -> tuple[str, str] | None:
    """The objective of the blind sweeps of a blind_vs_oracle study (None: not such a study). `true` takes
    val_blind_score (val ACC minus val adversarial concentration), the blind analogue of the oracle's ACC - ASR."""
    if value is None or value is False:
        return None
    if getattr(args, "knowledge", None):
        raise BadInput(f"{source}: blind_vs_oracle tunes each cell under both knowledge levels; drop --knowledge")
    if value is True:
        return DEFAULT_BLIND_OBJECTIVE
    objective = value.get("objective") if isinstance(value, dict) and set(value) <= {"objective"} else None
    if not isinstance(objective, dict) or set(objective) - {"metric", "mode"}:
        raise BadInput(
            f"{source}: blind_vs_oracle: true, or {{objective: {{metric: val_..., mode: max|min}}}} "
            f"(the blind sweeps' objective)"
        )
    metric, mode = str(objective.get("metric", DEFAULT_BLIND_OBJECTIVE[0])), str(objective.get("mode", "max"))
    if not metric.startswith("val_") or knowledge_of(metric) != BLIND:
        raise BadInput(
            f"{source}: blind_vs_oracle: objective.metric {metric!r} is not a blind validation metric; "
            f"blind metrics: {', '.join(blind_metrics())}"
        )
    if mode not in ("max", "min"):
        raise BadInput(f"{source}: blind_vs_oracle: objective.mode {mode!r}: use max or min")
    return metric, mode


def check_comparable(plan: SweepPlan, source: str) -> None:
    """Both selections of a cell whose defense trains the same under both levels are made from one set of trials;
    a searcher or scheduler that steers by one objective would make those trials the oracle's (or the blind's)."""
    if plan.searcher == "optuna" or plan.scheduler == "asha":
        raise BadInput(
            f"{source}: blind_vs_oracle selects twice from the same trials, which {plan.searcher} with "
            f"{plan.scheduler} would steer by one objective; use searcher random (or grid) and "
            f"scheduler fifo (the default of such a study)"
        )


def _tune_block(tune: Any, source: str) -> dict[str, Any]:
    if not isinstance(tune, dict) or set(tune) - TUNE_KEYS:
        raise BadInput(f"{source}: a mapping with keys among {', '.join(sorted(TUNE_KEYS))}")
    samples = tune.get("num_samples")
    if samples is not None and (not isinstance(samples, int) or isinstance(samples, bool) or samples < 0):
        raise BadInput(f"{source}: num_samples: 0 (run the presets, no sweep) or a positive integer, not {samples!r}")
    return dict(tune)


@dataclass
class StudyOutcome:
    study_run_id: str
    table: str
    failed: int


def run_study(session: Session, study: StudyPlan, args) -> StudyOutcome:
    tracker = session.open_tracker()
    study_run_id = tracker.start_run(
        f"study-{study.name}",
        {"role": "study", "dataset": study.dataset, "model": study.model, "study_file": str(study.path)},
    )
    tracker.log_params(
        study_run_id,
        {
            "attacks": [a for a, _ in study.attacks],
            "defenses": [d for d, _ in study.defenses],
            "seeds": study.seeds,
            "clean": study.clean,
            "jobs": study.jobs,
            "untuned": [study.defenses[i][0] for i in sorted(study.untuned)],
            **{f"tune.{k}": v for k, v in study.tune.items()},
        },
    )
    tracker.set_tags(
        study_run_id,
        {"layout": json.dumps({"attacks": [a for a, _ in study.attacks], "defenses": [d for d, _ in study.defenses]})},
    )
    if study.blind_objective:
        tracker.set_tags(study_run_id, {"mode": COMPARE_MODE, "blind_objective": " ".join(study.blind_objective)})
    tags = {"study_run_id": study_run_id}
    cells: dict[tuple[str, str], list[dict[str, float]]] = {}
    trials: dict[tuple[str, str], int] = {}
    pool = RunPool(session, study.jobs)
    with tracker.ending(study_run_id) as study_run:
        try:
            failed = attack_columns(study, pool, tracker, study_run_id, cells)
            if study.blind_objective:
                failed += run_comparison(session, study, pool, study_run_id, args.max_failures)
                pool.shutdown()
                study_run.status = "FINISHED" if not failed else "FAILED"
                return StudyOutcome(study_run_id, comparison_table(tracker, study_run_id, "md"), failed)
            finals: list[tuple[str, str, Any]] = []
            for ai, (attack, _) in enumerate(study.attacks):
                for di, (defense, _) in enumerate(study.defenses):
                    plan = study.sweeps[(ai, di)]
                    chosen: dict[str, Any] = {}
                    final_tags = {**tags, "knowledge": plan.knowledge}
                    if di not in study.untuned:
                        result = run_sweep(
                            session, plan, extra_tags=tags, parent_id=study_run_id, max_failures=args.max_failures
                        )
                        failed += result.failed
                        trials[(attack, defense)] = len(result.trials)
                        if result.best is None:
                            failed += 1
                            continue
                        chosen = dict(result.best["config"])
                        final_tags.update(sweep_run_id=result.sweep_run_id, selected_trial_id=result.best["trial_id"])
                        if result.constraints:  # whether the selected trial met the objective's bound
                            final_tags["selected_feasible"] = str(result.best_feasible).lower()
                    for seed in study.seeds:
                        spec = final_spec(plan, study.dataset, study.model, defense, attack, seed, chosen)
                        job = pool.submit(
                            f"{attack} x {defense} seed {seed}", "final", spec, final_tags, plan, parent_id=study_run_id
                        )
                        finals.append((attack, defense, job))
            for attack, defense, job in finals:
                outcome = pool.wait(job)
                if outcome is None:
                    failed += 1
                    continue
                cells.setdefault((attack, defense), []).append(outcome[1])
        except BaseException:
            pool.shutdown(cancel=True)
            raise
        pool.shutdown()
        table = format_table(study, cells, trials)
        study_run.status = "FINISHED" if not failed else "FAILED"
    return StudyOutcome(study_run_id, table, failed)


def attack_columns(
    study: StudyPlan, pool: RunPool, tracker, study_run_id: str, cells: dict[tuple[str, str], list[dict[str, float]]]
) -> int:
    """Train the no-defense (and clean-model) column of every attack and seed, record them on the study run;
    returns how many failed. Every final run afterwards trains on one of these models (served by the cache)."""
    tags = {"study_run_id": study_run_id}
    failed = 0
    columns = [("none", False)] + ([("clean", True)] if study.clean else [])
    built: dict[tuple[str, str], list[Any]] = {}
    for ai, (attack, _) in enumerate(study.attacks):
        first = study.sweeps[(ai, 0)]
        for column, clean in columns:
            for seed in study.seeds:
                spec = resolve_run(
                    first.base.method,
                    study.dataset,
                    study.model,
                    seed,
                    attack,
                    attack_base={
                        **{k: v for k, v in first.base.attack_config.items() if k != "seed"},
                        **({"poison_rate": 0.0} if clean else {}),
                    },
                    data_base=first.base.data_config,
                    use_preset=False,
                )
                spec.recipe = first.base.recipe
                label = f"{attack} {'clean model' if clean else 'no defense'} seed {seed}"
                built.setdefault((attack, column), []).append(pool.submit(label, "attack", spec, tags, first))
    # bdo report reads these columns from the recorded ids, not from the study_run_id tag: a cached attack
    # keeps the tags of whichever command built it, and the sweeps' own attacks (tuning seed, a space's data
    # block) carry this study's tag without belonging to the column.
    recorded: dict[str, dict[str, list[str]]] = {"none": {}, "clean": {}}
    for (attack, column), jobs in built.items():
        for job in jobs:
            outcome = pool.wait(job)
            if outcome is None:
                failed += 1
                continue
            run_id, metrics = outcome
            cells.setdefault((attack, column), []).append(metrics)
            recorded[column].setdefault(attack, []).append(run_id)
    tracker.set_tags(
        study_run_id,
        {"no_defense_run_ids": json.dumps(recorded["none"]), "clean_run_ids": json.dumps(recorded["clean"])},
    )
    return failed


def format_table(
    study: StudyPlan, cells: dict[tuple[str, str], list[dict[str, float]]], trials: dict[tuple[str, str], int]
) -> str:
    """The study's table from the metrics it holds in memory, drawn by the same renderer as `bdo report` (which
    reads them back from MLflow), so the two can be compared cell by cell."""
    no_defense, clean_model = ATTACK_COLUMNS["no_defense_run_ids"], ATTACK_COLUMNS["clean_run_ids"]
    columns = [no_defense] + ([clean_model] if study.clean else []) + [d for d, _ in study.defenses]
    summary = {}
    for (attack, column), runs in cells.items():
        name = {"none": no_defense, "clean": clean_model}.get(column, column)
        summary[(attack, name)] = {
            "seeds": len(runs),
            "trials": trials.get((attack, column), 0),
            "outside_papers": outside_papers([r.get(PAPERS_REGIME) for r in runs]),
            **{m: mean_std([r.get(f"test_{m}", math.nan) for r in runs]) for m in ("acc", "asr")},
        }
    return render([a for a, _ in study.attacks], columns, summary, ["acc", "asr"], "md")
