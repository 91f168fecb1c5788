"""`bdo tune` and the sweeps of a study: build the attack once, run a Tune sweep whose trials are child runs of
one sweep run, resume an interrupted one, select on validation and log what the sweep found."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.console import SweepProgress
from orchestrator.devices import ClusterShape, driver_device, resolve_gpus
from orchestrator.errors import BadInput
from orchestrator.execute import base_tags, build_attack
from orchestrator.objective import OBJECTIVE_METRIC, select
from orchestrator.plots import pareto_front, pareto_png
from orchestrator.session import Session, check_resources, quiet_libraries
from orchestrator.signals import Interrupted, winding_down
from orchestrator.spaces import PARETO_METRICS, SweepPlan, default_point, tune_param_space
from orchestrator.tracking import Tracker, system_metrics_interval

TRIAL_COLUMNS = ("val_acc", "val_asr", "val_der", "test_acc", "test_asr", "test_der")


def space_fingerprint(plan: SweepPlan) -> str:
    return hashlib.sha256(Path(plan.space.path).read_bytes()).hexdigest()[:16]


@dataclass
class SweepResult:
    sweep_run_id: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    pareto: list[dict[str, Any]] = field(default_factory=list)
    failed: int = 0
    # the selection rule, for the table (format_trials): its constraints, and whether the best trial meets them
    constraints: dict[str, float] = field(default_factory=dict)
    objective_text: str = ""
    best_feasible: bool = True


def _scheduler(plan: SweepPlan):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if plan.scheduler == "asha":
        max_t = plan.space.max_t or 10_000
        return ASHAScheduler(
            time_attr="step",
            max_t=max_t,
            grace_period=plan.space.grace_period,
            reduction_factor=plan.space.reduction_factor,
        )
    return FIFOScheduler()


def _search_alg(plan: SweepPlan, seed: int):
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    start = default_point(plan)
    points = [start] if start else None
    if plan.searcher != "optuna":
        # seeded like Optuna, so the same command samples the same trials. The generator limits concurrency itself:
        # Tune applies max_concurrent_trials only to a Searcher and ignored it here, with a warning per sweep.
        return BasicVariantGenerator(
            points_to_evaluate=points, random_state=seed, max_concurrent=plan.max_concurrent or 0
        )
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    if plan.objective == "pareto":
        metric = [m for m, _ in PARETO_METRICS]
        mode = [d for _, d in PARETO_METRICS]
        alg = OptunaSearch(
            metric=metric, mode=mode, points_to_evaluate=points, sampler=optuna.samplers.TPESampler(seed=seed)
        )
    else:
        alg = OptunaSearch(
            metric=plan.tune_metric,
            mode=plan.tune_mode,
            points_to_evaluate=points,
            sampler=optuna.samplers.TPESampler(seed=seed),
        )
    return ConcurrencyLimiter(alg, max_concurrent=plan.max_concurrent or 2)


class _StatusCallback:
    """Driver-side: when Tune finishes or errors a trial, its MLflow run gets the matching terminal status,
    even if the trial process was killed or stopped by the scheduler before it could say so itself."""

    def __new__(cls, *args, **kwargs):
        from ray.tune import Callback

        class StatusCallback(Callback):
            def __init__(self, tracker: Tracker, sweep_run_id: str) -> None:
                self.tracker, self.sweep_run_id = tracker, sweep_run_id

            def _finish(self, trial, status: str) -> None:
                for run in self.tracker.children(self.sweep_run_id, f"tags.trial_id = '{trial.trial_id}'"):
                    if run.info.status == "RUNNING" or status == "FAILED":
                        self.tracker.end(run.info.run_id, status)

            def on_trial_complete(self, iteration, trials, trial, **info):
                self._finish(trial, "FINISHED")

            def on_trial_error(self, iteration, trials, trial, **info):
                self._finish(trial, "FAILED")

        return StatusCallback(*args, **kwargs)


def sweep_attack(
    session: Session, plan: SweepPlan, tracker: Tracker, extra_tags: dict[str, str] | None
) -> tuple[str, str, dict[str, float]]:
    """The attack a defense sweep's trials start from, built where its trials train (orchestrator/placement.py):
    (its run id, its cache key, its metrics). A cached one is read, not rebuilt, wherever it is placed."""
    from orchestrator.placement import get_task, placement, session_fields, submit_task

    where = placement(plan)
    if not where.in_task:
        backdoor, run_id, key = build_attack(
            plan.base,
            tracker,
            session.storage,
            session.data_root,
            session.download,
            extra_tags=extra_tags,
            device=driver_device(plan),
        )
        return run_id, key, backdoor.metrics
    print(f"attack {plan.base.attack}: building (or reading from the cache) {where.describe()}", flush=True)
    ref = submit_task(
        where, session_fields(session), "attack", plan.base, extra_tags or {}, None, where.device, where.threads
    )
    run_id, metrics, seconds, key = get_task(ref)
    print(
        f"attack {plan.base.attack}: run {run_id}, test_acc={metrics.get('test_acc', math.nan):.3f} "
        f"test_asr={metrics.get('test_asr', math.nan):.3f} ({seconds:.0f} s)",
        flush=True,
    )
    return run_id, key, metrics


def run_sweep(
    session: Session,
    plan: SweepPlan,
    extra_tags: dict[str, str] | None = None,
    parent_id: str | None = None,
    resume_run_id: str | None = None,
    max_failures: int = 1,
) -> SweepResult:
    """`bdo tune`: build the attack once, then a Tune sweep whose trials are child runs of one sweep run."""
    from ray import tune

    from orchestrator.trial import TrialSetup, tune_trainable

    shape = ClusterShape.from_ray()
    check_resources([plan], shape, session.largest_node())  # before the store is touched or the attack is built
    plan = resolve_gpus(plan, shape)  # before the store is touched: a bad share is bad input
    tracker = session.open_tracker()
    spec = plan.base
    cache_key = attack_run_id = reference_acc = None
    if spec.kind == "defense":
        attack_run_id, cache_key, attack_metrics = sweep_attack(session, plan, tracker, extra_tags)
        # the reference of val_acc_drop: the suspect model's validation ACC (orchestrator/objective.py)
        reference_acc = attack_metrics.get("val_acc")
    seeds = spec.attack_cfg().seeds()
    tune_root = session.storage / "tune"
    if resume_run_id:
        sweep_run_id = resume_run_id
        tune_path = tracker.client.get_run(sweep_run_id).data.tags.get("tune_path")
        tracker.client.update_run(sweep_run_id, status="RUNNING")
    else:
        tags = {
            **base_tags(spec, "sweep", seeds),
            "space": str(plan.space.path),
            "space_sha256": space_fingerprint(plan),
            "searcher": plan.searcher,
            "scheduler": plan.scheduler,
            "objective": plan.objective,
            "objective_metric": plan.space.metric,
            "objective_mode": plan.space.mode,
            "objective_rule": plan.objective_text,
            "tune_metric": plan.tune_metric,
            "knowledge": plan.knowledge,
            "gpus_per_trial": f"{plan.gpus_per_trial:g}",
            "storage": str(session.storage),
            **(extra_tags or {}),
        }
        if attack_run_id:
            tags["attack_run_id"], tags["attack_cache_key"] = attack_run_id, cache_key
        sweep_run_id = tracker.start_run(f"sweep-{spec.method}", tags, parent_id)
        tracker.log_params(
            sweep_run_id,
            {
                **spec.flat_params(),
                **{f"space.{d.key}": f"{d.kind} {d.args}" for d in plan.tuned},
                "num_samples": plan.num_samples,
            },
        )
        tune_path = str(tune_root / f"{spec.method}-{sweep_run_id[:12]}")
        tracker.set_tags(sweep_run_id, {"tune_path": tune_path})

    setup = TrialSetup(
        plan=plan,
        tracking_uri=tracker.uri,
        experiment_id=tracker.experiment_id,
        sweep_run_id=sweep_run_id,
        storage=str(session.storage),
        cache_key=cache_key,
        attack_run_id=attack_run_id,
        data_root=str(session.data_root),
        download=session.download,
        tags={**(extra_tags or {}), "knowledge": plan.knowledge},
        max_failures=max_failures,
        fault=os.environ.get("BDO_FAULT"),
        system_metrics=system_metrics_interval(),
        reference_acc=reference_acc,
    )
    if plan.workers_per_trial > 1:
        resources: dict[str, float] = {"CPU": 0.01}
    else:
        resources = {"CPU": plan.cpus_per_trial, "GPU": plan.gpus_per_trial}
    trainable = tune.with_resources(tune.with_parameters(tune_trainable, setup=setup), resources)
    single = plan.objective == "single"
    callbacks = [_StatusCallback(tracker, sweep_run_id)]
    if not session.verbose:
        quiet_libraries()
        callbacks.append(SweepProgress(spec.method, plan.tune_metric, plan.tune_mode, plan.num_samples))
    # Some objectives exist only at a run's last step (SD's val_fct_auroc is computed once, on the final split);
    # Tune's strict check would fail such a sweep at its first report. summarize() still refuses to pick a best
    # trial on a metric that no trial reported.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Trials checkpoint every epoch and keep two, so Tune snapshots its state every second checkpoint (what keeps
    # --resume pointing at checkpoints that still exist). With second-long epochs it warned about that on every
    # snapshot, hundreds of times in one quickstart; the snapshots are cheap next to the checkpoints themselves.
    os.environ["TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"] = "0"
    # Tune's own SIGINT handler would end the sweep as if it were done; winding_down (with stop_tune) stops it the
    # same careful way on any stop signal, and the sweep then ends KILLED
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    stale = signal.getsignal(signal.SIGUSR1)  # Tune's handler of an earlier sweep in this process, if any

    def stop_tune(signum: int, frame) -> None:
        """Asks Tune's loop to end early, as its own SIGINT handler would: it stops the trials and saves its state
        one last time (what --resume continues from), then fit returns. Tune listens on SIGUSR1 while it loops."""
        handler = signal.getsignal(signal.SIGUSR1)
        if handler is stale or not callable(handler):  # the loop has not started: there is nothing to save
            raise Interrupted(signum)
        handler(signum, frame)

    with tracker.ending(sweep_run_id) as sweep:
        try:
            if resume_run_id:
                if not tune_path or not tune.Tuner.can_restore(tune_path):
                    raise BadInput(
                        f"--resume {resume_run_id}: its Tune state at {tune_path} is missing; start a new sweep"
                    )
                tuner = tune.Tuner.restore(tune_path, trainable, resume_unfinished=True, resume_errored=True)
            else:
                tuner = tune.Tuner(
                    trainable,
                    param_space=tune_param_space(plan),
                    tune_config=tune.TuneConfig(
                        metric=plan.tune_metric if single else None,
                        mode=plan.tune_mode if single else None,
                        search_alg=_search_alg(plan, spec.config.get("seed", 0) or 0),
                        scheduler=_scheduler(plan),
                        num_samples=plan.num_samples,  # concurrency: set on the search algorithm (_search_alg)
                        # the next trial runs in a finished trial's process: no new Python importing torch and mlflow
                        # per trial (on 2 cores that cost ~14 s of trial-slot time per trial; benchmarks sweep.reuse)
                        reuse_actors=True,
                    ),
                    run_config=tune.RunConfig(
                        name=Path(tune_path).name,
                        storage_path=str(tune_root),
                        callbacks=callbacks,
                        verbose=int(session.verbose),
                        failure_config=tune.FailureConfig(max_failures=max_failures),
                        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                    ),
                )
            with winding_down(stop_tune) as caught:
                grid = tuner.fit()
        except BaseException:
            _end_cut_trials(tracker, sweep_run_id)
            raise
        result = summarize(tracker, plan, sweep_run_id, grid, interrupted=bool(caught), reference_acc=reference_acc)
        if caught:
            raise Interrupted(caught[0], result)
        sweep.status = "FINISHED" if result.trials and result.failed < len(result.trials) else "FAILED"
    return result


def _end_cut_trials(tracker: Tracker, sweep_run_id: str) -> None:
    """A trial whose run is still open when its sweep ends was cut off (or orphaned by a kill): KILLED."""
    for run in tracker.children(sweep_run_id):
        if run.info.status == "RUNNING":
            tracker.end(run.info.run_id, "KILLED")


def summarize(
    tracker: Tracker,
    plan: SweepPlan,
    sweep_run_id: str,
    grid,
    interrupted: bool = False,
    reference_acc: float | None = None,
) -> SweepResult:
    """Close every child run, pick the best trial on validation metrics (and the Pareto front), log it all. An
    interrupted sweep's trials that Tune had not finished were cut: their runs end KILLED, and nothing is selected
    or logged on the sweep run (its resume does that, over every trial). Under a constraint the best trial is the
    best feasible one, else the closest to feasibility, flagged (orchestrator/objective.py)."""
    out = SweepResult(sweep_run_id, constraints=plan.constraints, objective_text=plan.objective_text)
    objective_keys = (plan.space.metric, *plan.constraints, *((OBJECTIVE_METRIC,) if plan.constraints else ()))
    runs = {r.data.tags.get("trial_id"): r for r in tracker.children(sweep_run_id)}
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        metrics = result.metrics or {}
        # every split metric of the trial's last report (the returned model), so that a caller may select or
        # correlate on metrics other than the sweep's own objective (the study's blind-vs-oracle comparison)
        row = {
            "trial_id": metrics.get("trial_id", trial_id),
            "config": result.config,
            "error": result.error is not None,
            # Tune marks a trial's last result done when the trial returned or its scheduler stopped it
            "cut": interrupted and result.error is None and not metrics.get("done"),
            **{k: v for k, v in metrics.items() if k.startswith(("val_", "test_"))},
            **{k: metrics.get(k, math.nan) for k in (*TRIAL_COLUMNS, *objective_keys)},
            "step": metrics.get("step"),
        }
        run = runs.get(row["trial_id"])
        row["run_id"] = run.info.run_id if run else None
        if run is not None:
            status = "FAILED" if row["error"] else "KILLED" if row["cut"] else "FINISHED"
            if tracker.status(run.info.run_id) != status:
                tracker.end(run.info.run_id, status)
        out.failed += int(row["error"])
        out.trials.append(row)
    _end_cut_trials(tracker, sweep_run_id)  # anything Tune no longer knows about was orphaned by a kill
    if interrupted:
        return out
    log_trials_csv(tracker, sweep_run_id, out.trials, plan.space.metric, objective_keys)
    if plan.searcher == "optuna":
        log_search_plots(tracker, sweep_run_id, plan, out.trials)
    ok = [t for t in out.trials if not t["error"]]
    best, feasible = select(out.trials, plan.space.metric, plan.space.mode, plan.constraints)
    if reference_acc is not None and plan.base.kind == "defense":
        tracker.log_metrics(sweep_run_id, {"reference_val_acc": float(reference_acc)}, 0)
    if best is not None:
        out.best = best
        tags = {"best_trial_id": best["trial_id"], "best_run_id": best["run_id"] or ""}
        shown = list(dict.fromkeys((*TRIAL_COLUMNS, *objective_keys)))
        best_metrics = {f"best_{k}": _metric(best, k) for k in shown if not math.isnan(_metric(best, k))}
        if plan.constraints:
            out.best_feasible = feasible
            tags["best_feasible"] = str(feasible).lower()
            best_metrics["best_feasible"] = float(feasible)
            if not feasible:
                bounds = ", ".join(f"{k} <= {v:g}" for k, v in plan.constraints.items())
                print(
                    f"{plan.base.method}: no trial met {bounds}; selected the one closest to it, "
                    f"{best['trial_id']} (best_feasible=false on the sweep run)",
                    flush=True,
                )
        tracker.set_tags(sweep_run_id, tags)
        tracker.log_params(sweep_run_id, {f"best.{k}": v for k, v in best["config"].items()})
        tracker.log_metrics(sweep_run_id, best_metrics, 0)
    points = [(t["val_acc"], t["val_asr"]) for t in ok]
    front = [ok[i] for i in pareto_front(points)] if points else []
    out.pareto = front
    if front:
        import json
        import tempfile

        for t in front:
            if t["run_id"]:
                tracker.set_tags(t["run_id"], {"pareto": "true"})
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "pareto.json").write_text(
                json.dumps(
                    [{k: t[k] for k in ("trial_id", "run_id", "val_acc", "val_asr", "config")} for t in front],
                    indent=1,
                    default=str,
                )
            )
            plot_dir = Path(d) / "plots"
            plot_dir.mkdir()
            pareto_png(plot_dir / "pareto.png", points)
            tracker.log_artifact(sweep_run_id, Path(d) / "pareto.json")
            tracker.log_artifact(sweep_run_id, plot_dir, "plots")
    return out


def best_trial(
    trials: list[dict[str, Any]], metric: str, mode: str, constraints: dict[str, float] | None = None
) -> dict[str, Any] | None:
    """The finished trial with the best `metric` (validation), or None when no trial reported it; under
    `constraints`, the best feasible one, else the closest to feasibility (orchestrator.objective.select). Ties go
    to the earlier trial, which is the default point when the sweep evaluated one."""
    return select(trials, metric, mode, constraints)[0]


def parameter_importances(plan: SweepPlan, trials: list[dict[str, Any]]) -> dict[str, float]:
    """Optuna's fANOVA importances of the searched parameters, over the finished trials of any searcher."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    def distribution(d):
        if d.kind in ("choice", "grid"):
            return CategoricalDistribution(list(d.args))
        if d.kind == "randint":
            return IntDistribution(int(d.args[0]), int(d.args[1]) - 1)
        return FloatDistribution(float(d.args[0]), float(d.args[1]), log=d.kind == "loguniform")

    dists = {d.key: distribution(d) for d in plan.tuned}
    study = optuna.create_study(direction="maximize" if plan.space.mode == "max" else "minimize")
    for t in trials:
        value = _metric(t, plan.space.metric)
        if t["error"] or math.isnan(value):
            continue
        params = {k: t["config"][k] for k in dists if k in t["config"]}
        study.add_trial(
            optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params}, value=value)
        )
    return dict(optuna.importance.get_param_importances(study))


def log_search_plots(tracker: Tracker, sweep_run_id: str, plan: SweepPlan, trials: list[dict[str, Any]]) -> None:
    """plots/search_history.png and plots/param_importance.png on an Optuna sweep's run."""
    import tempfile

    from orchestrator.plots import importance_png, search_history_png

    ordered = sorted(trials, key=lambda t: str(t["trial_id"]))
    values = [_metric(t, plan.space.metric) for t in ordered]
    with tempfile.TemporaryDirectory() as d:
        plot_dir = Path(d) / "plots"
        plot_dir.mkdir()
        search_history_png(plot_dir / "search_history.png", values, plan.space.mode, plan.space.metric)
        if sum(not math.isnan(v) for v in values) >= 3 and plan.tuned:
            logging.getLogger("optuna").setLevel(logging.WARNING)
            importance_png(plot_dir / "param_importance.png", parameter_importances(plan, ordered), plan.space.metric)
        tracker.log_artifact(sweep_run_id, plot_dir, "plots")


def log_trials_csv(
    tracker: Tracker, sweep_run_id: str, trials: list[dict[str, Any]], metric: str, extra: tuple[str, ...] = ()
) -> None:
    """trials.csv on the sweep run: a row per trial with its status, sampled values and final metrics, which the
    terminal table only printed (`extra`: the objective's constraint metrics and val_objective)."""
    import csv
    import tempfile

    columns = list(dict.fromkeys((metric, *extra, *TRIAL_COLUMNS)))
    keys = sorted({k for t in trials for k in t["config"]})
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "trials.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["trial_id", "run_id", "status", "step", *columns, *keys])
            for t in trials:
                writer.writerow(
                    [
                        t["trial_id"],
                        t["run_id"] or "",
                        "FAILED" if t["error"] else "done",
                        t["step"],
                        *(_metric(t, c) for c in columns),
                        *(t["config"].get(k, "") for k in keys),
                    ]
                )
        tracker.log_artifact(sweep_run_id, path)


def _metric(row: dict[str, Any], key: str) -> float:
    value = row.get(key, math.nan)
    return math.nan if value is None else float(value)


def find_resumable_sweep(tracker: Tracker, plan: SweepPlan, storage: Path, run_id: str | None) -> str:
    if run_id:
        try:
            run = tracker.client.get_run(run_id)
        except Exception:
            raise BadInput(f"--resume {run_id}: no such run in this tracking store") from None
        if run.data.tags.get("role") != "sweep":
            raise BadInput(f"--resume {run_id}: that run is not a sweep (role={run.data.tags.get('role')})")
        return run_id
    query = (
        f"tags.role = 'sweep' and tags.space_sha256 = '{space_fingerprint(plan)}' "
        f"and tags.storage = '{storage}' and attributes.status != 'FINISHED'"
    )
    runs = tracker.search(query)
    if not runs:
        raise BadInput(
            f"--resume: no unfinished sweep of {plan.space.path} in this experiment and storage; "
            "start one without --resume"
        )
    return runs[0].info.run_id


def format_trials(result: SweepResult, metric: str) -> str:
    columns = (
        tuple(dict.fromkeys((metric, *result.constraints, *TRIAL_COLUMNS)))
        if metric not in TRIAL_COLUMNS or result.constraints
        else TRIAL_COLUMNS
    )
    widths = [max(9, len(c)) for c in columns]
    header = f"{'trial':<22} {'status':<8} " + " ".join(f"{c:>{w}}" for c, w in zip(columns, widths))
    lines = [header, "-" * len(header)]
    for t in result.trials:
        mark = "*" if result.best is t else " "
        cells = " ".join(f"{_metric(t, c):{w}.3f}" for c, w in zip(columns, widths))
        status = "FAILED" if t["error"] else "cut" if t["cut"] else "done"
        lines.append(f"{mark}{t['trial_id']:<21} {status:<8} {cells}")
    rule = result.objective_text if result.constraints else metric
    lines.append(f"* selected on {rule} (validation); test columns are reported, never used to choose")
    if result.best is not None and not result.best_feasible:
        lines.append("  no trial met the constraint: * is the trial closest to it")
    return "\n".join(lines)
