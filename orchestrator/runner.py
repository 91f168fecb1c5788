"""What the CLI commands do once their input is validated: single runs, sweeps (with resume), and Ray set-up."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.context import TrackedContext
from orchestrator.devices import ClusterShape, driver_device, pick_device, resolve_gpus
from orchestrator.errors import BadInput
from orchestrator.execute import (
    base_tags,
    build_attack,
    execute_defense,
    fault_hook,
)
from orchestrator.objective import OBJECTIVE_METRIC, select
from orchestrator.plots import pareto_front, pareto_png
from orchestrator.resolve import RunSpec
from orchestrator.resumable import resumable_run
from orchestrator.signals import Interrupted, kept_handlers, local_ray_in_its_own_session, winding_down
from orchestrator.spaces import PARETO_METRICS, SweepPlan, default_point, tune_param_space
from orchestrator.tracking import Tracker, is_local_store, system_metrics_interval

TRIAL_COLUMNS = ("val_acc", "val_asr", "val_der", "test_acc", "test_asr", "test_der")


@dataclass
class Session:
    """Where runs go: tracking store, experiment, storage, data, Ray address."""

    tracking_uri: str
    experiment: str
    storage: Path
    data_root: Path
    download: bool = False
    address: str | None = None
    verbose: bool = False  # Ray's, Tune's and the trials' own output; off: one line per trial (SweepProgress)
    # the user says --storage is on a filesystem every node mounts (--shared-storage, BDO_SHARED_STORAGE=1)
    shared_storage: bool = False
    tracker: Tracker | None = None
    _started_ray: bool = False

    def open_tracker(self) -> Tracker:
        if self.tracker is None:
            self.tracker = Tracker(self.tracking_uri, self.experiment)
        return self.tracker

    def start_ray(self, num_cpus: float | None = None) -> None:
        import ray

        os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
        if not ray.is_initialized():
            env = {"RAY_CHDIR_TO_TRIAL_DIR": "0", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
            for key in ("BDO_DATA_ROOT", "MLFLOW_TRACKING_URI"):
                if key in os.environ:
                    env[key] = os.environ[key]
            env = without_job_env_vars(env, job_env_vars())
            if not self.verbose:
                quiet_libraries()
            kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": self.verbose,
                                      "logging_level": logging.INFO if self.verbose else logging.WARNING}
            with kept_handlers():  # bdo's stop signals end runs KILLED; stop_ray still shuts a local Ray down
                if self.address:
                    ray.init(address=self.address, **kwargs)
                else:
                    with local_ray_in_its_own_session():
                        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
            self._started_ray = True
        alive = [n for n in ray.nodes() if n.get("Alive")]
        if len(alive) > 1 and is_local_store(self.tracking_uri):
            self.stop_ray()
            raise BadInput(f"--tracking-uri {self.tracking_uri}: this Ray cluster has {len(alive)} nodes and other "
                           "nodes cannot write a local sqlite file; point --tracking-uri (or MLFLOW_TRACKING_URI) "
                           "at the head node's MLflow server, e.g. http://<head-ip>:5000")
        if len(alive) > 1 and not self.shared_storage and (fs := local_filesystem(self.storage)) is not None:
            self.stop_ray()
            raise BadInput(f"--storage {self.storage}: this Ray cluster has {len(alive)} nodes and {fs}, which other "
                           "nodes cannot see (their trials' checkpoints and the attack cache would never reach this "
                           "driver); put --storage (or BDO_STORAGE) on a filesystem every node mounts (NFS, EFS, "
                           "Lustre), or pass --shared-storage (BDO_SHARED_STORAGE=1) if it already is one")

    def largest_node(self) -> str:
        """The node a trial's resources are checked against, in words (check_resources)."""
        return f"the largest node of the Ray cluster at {self.address}" if self.address else \
            "this machine (a local Ray's only node)"

    def stop_ray(self) -> None:
        import ray

        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        self._started_ray = False


# filesystem types that other machines can mount too: a storage path on one of them is taken as shared
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "glusterfs", "beegfs", "orangefs", "pvfs2",
    "ocfs2", "gfs2", "afs", "9p", "virtiofs", "panfs", "wekafs", "fuse.glusterfs", "fuse.cephfs", "fuse.s3fs",
    "fuse.gcsfuse", "fuse.mount-s3", "fuse.juicefs", "fuse.sshfs", "fuse.rclone", "fuse.lustre", "fuse.beegfs",
})


def mount_of(path: Path, mounts: str) -> tuple[str, str] | None:
    """(mount point, filesystem type) of the mount that holds `path`, from the text of /proc/mounts: the entry
    with the longest mount point above it (the last one, where a later mount hides an earlier one)."""
    best: tuple[str, str] | None = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")  # /proc/mounts escapes a space in a mount point as \040
        if path == Path(point) or Path(point) in path.parents:
            if best is None or len(point) >= len(best[0]):
                best = (point, fields[2])
    return best


def local_filesystem(storage: Path, mounts: str | None = None) -> str | None:
    """Why `storage` is on this machine only, in words (its mount and filesystem type), or None when it is on a
    network filesystem (NETWORK_FILESYSTEMS), or when the mount table cannot be read (nothing to go on)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    found = mount_of(storage, mounts)
    if found is None:
        return None
    point, fstype = found
    if fstype in NETWORK_FILESYSTEMS:
        return None
    return f"it is on {point} ({fstype}), a local filesystem"


def cpus_named(plan: SweepPlan) -> str:
    """How the user asked for the plan's CPUs per trial: the flag, or the space's resources block."""
    if plan.space.resources.get("cpus_per_trial") == plan.cpus_per_trial:
        return f"{plan.space.path}: resources.cpus_per_trial {plan.cpus_per_trial:g}"
    return f"--cpus-per-trial {plan.cpus_per_trial:g}"


def check_resources(plans: list[SweepPlan], shape: ClusterShape, where: str) -> None:
    """A trial asks Ray for its CPUs (and GPUs) on one node (a DDP trial: its share per worker): more than the
    largest node has, and Tune waits for them for ever, after the attack was built. Refused up front instead.
    `where`: the largest node, in words (Session.largest_node)."""
    from orchestrator.devices import check_gpu_request

    most = max(shape.node_cpus, default=0.0)
    for plan in plans:
        check_gpu_request(plan.gpus_per_trial, list(shape.node_gpus))
        workers = max(plan.workers_per_trial, 1)
        need = plan.cpus_per_trial / workers
        if need > most:
            per = f" over --workers-per-trial {workers} ({need:g} per worker)" if workers > 1 else ""
            raise BadInput(f"{cpus_named(plan)}{per}: {where} has {most:g} CPUs, and Ray would wait for ever for "
                           f"more; ask for at most {most:g} per {'worker' if workers > 1 else 'trial'}")


def job_env_vars() -> dict[str, str]:
    """The env vars of the Ray job this driver runs as (`ray job submit --runtime-env-json`), which Ray hands the
    entrypoint in RAY_JOB_CONFIG_JSON_ENV_VAR and merges with ray.init's runtime env; none outside a job."""
    config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not config:
        return {}
    return (json.loads(config).get("runtime_env") or {}).get("env_vars") or {}


def without_job_env_vars(wanted: dict[str, str], job: dict[str, str]) -> dict[str, str]:
    """The env vars bdo may add to ray.init's runtime env inside a job. Ray refuses to merge a job's runtime env
    with one that sets any of the same variables, even to the same value; and the job's value is the one its
    processes, this driver included, already see, so it stays the value for the trials too."""
    return {key: value for key, value in wanted.items() if key not in job}


def quiet_libraries() -> None:
    """What a person running bdo does not need to read unless they ask with --verbose: Tune's experiment banner
    and TensorBoard hint (printed whatever the verbosity by Tune's newer output engine, so the older one, which
    is silent at verbose 0, is chosen), its per-sweep 'wrote the result files' line, Ray's note that the local
    instance uses token auth, and MLflow's lines while it creates a store."""
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    for name in ("ray.tune", "ray._private.authentication.authentication_token_setup", "ray._private.worker"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)


# the longest a sweep's output goes without a line (SweepProgress's summary), in seconds; BDO_PROGRESS_INTERVAL
# sets it. Tune is silent while trials train between reports, and a Ray job's log should show the sweep alive.
PROGRESS_INTERVAL = 60.0


def progress_interval() -> float:
    """BDO_PROGRESS_INTERVAL (seconds, > 0), else PROGRESS_INTERVAL."""
    try:
        value = float(os.environ.get("BDO_PROGRESS_INTERVAL", ""))
    except ValueError:
        return PROGRESS_INTERVAL
    return value if value > 0 and math.isfinite(value) else PROGRESS_INTERVAL


class SweepProgress:
    """One line per finished trial (and, on a terminal, a status line rewritten in place while trials run): the
    trial, its state, its last validation metrics and the best objective so far. And, when nothing was printed for
    progress_interval() seconds, a summary line: trials running, pending, finished and errored, the best objective
    reported so far, and the time since the sweep started; checked on every step of Tune's loop, which steps
    several times a second whether or not a trial reports."""

    def __new__(cls, *args, **kwargs):
        from ray.tune import Callback

        class Progress(Callback):
            def __init__(self, label: str, metric: str, mode: str, total: int, interval: float | None = None,
                         clock=time.monotonic) -> None:
                self.label, self.metric, self.mode, self.total = label, metric, mode, total
                self.done, self.best, self.tty = 0, None, sys.stdout.isatty()
                self.interval = progress_interval() if interval is None else interval
                self.clock = clock
                self.started = self.printed = clock()

            def _better(self, value) -> bool:
                if not isinstance(value, (int, float)) or math.isnan(value):
                    return False
                return self.best is None or (value > self.best if self.mode == "max" else value < self.best)

            def summary(self, trials) -> str:
                counts = {"RUNNING": 0, "PENDING": 0, "PAUSED": 0, "TERMINATED": 0, "ERROR": 0}
                best = self.best
                for trial in trials:
                    counts[trial.status] = counts.get(trial.status, 0) + 1
                    value = (trial.last_result or {}).get(self.metric)
                    if trial.status != "ERROR" and isinstance(value, (int, float)) and not math.isnan(value):
                        if best is None or (value > best if self.mode == "max" else value < best):
                            best = value
                shown = f"{best:.3f}" if best is not None else "-"
                elapsed = int(self.clock() - self.started)
                return (f"{self.label}: progress  running {counts['RUNNING']}  pending "
                        f"{counts['PENDING'] + counts['PAUSED']}  finished {counts['TERMINATED']}/{self.total}  "
                        f"errored {counts['ERROR']}  best {self.metric} {shown}  "
                        f"elapsed {elapsed // 3600}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}")

            def on_step_end(self, iteration, trials, **info):
                if self.clock() - self.printed >= self.interval:
                    prefix = "\r\033[K" if self.tty else ""
                    print(f"{prefix}{self.summary(trials)}", flush=True)
                    self.printed = self.clock()

            def _shown(self, result: dict) -> str:
                keys = dict.fromkeys((self.metric, "val_acc", "val_asr"))
                return "  ".join(f"{k}={result[k]:.3f}" for k in keys if isinstance(result.get(k), (int, float)))

            def on_trial_result(self, iteration, trials, trial, result, **info):
                if self.tty:
                    line = f"{self.label}: trial {trial.trial_id} step {result.get('step', '?')}  {self._shown(result)}"
                    print(f"\r\033[K{line[:150]}", end="", flush=True)

            def _finish(self, trial, state: str) -> None:
                self.done += 1
                result = trial.last_result or {}
                value = result.get(self.metric)
                if self._better(value):
                    self.best = value
                best = f"  (best {self.metric} {self.best:.3f})" if self.best is not None else ""
                prefix = "\r\033[K" if self.tty else ""
                print(f"{prefix}{self.label}: trial {self.done}/{self.total} {trial.trial_id} {state}  "
                      f"{self._shown(result)}{best}", flush=True)
                self.printed = self.clock()

            def on_trial_complete(self, iteration, trials, trial, **info):
                self._finish(trial, "done")

            def on_trial_error(self, iteration, trials, trial, **info):
                self._finish(trial, "FAILED")

        return Progress(*args, **kwargs)


class ProgressPrinter:
    """A one-line-per-step progress display for single runs."""

    def __init__(self, label: str, total: int | None, fault=None) -> None:
        self.label, self.total, self.started = label, total, time.perf_counter()
        self.steps = 0
        self.fault = fault  # BDO_FAULT's hook (execute.fault_hook), for the interruption tests of plain runs

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        self.steps += 1
        if self.fault is not None:
            self.fault(step, metrics)
        shown = "  ".join(f"{k}={metrics[k]:.3f}" for k in ("val_acc", "val_asr", "test_acc", "test_asr")
                          if k in metrics)
        total = f"/{self.total}" if self.total else ""
        bar = ""
        if self.total:
            filled = int(20 * min(step, self.total) / self.total)
            bar = "[" + "#" * filled + "." * (20 - filled) + "] "
        print(f"{self.label} {bar}step {step}{total}  {shown}  ({time.perf_counter() - self.started:.0f}s)", flush=True)


def run_single(session: Session, spec: RunSpec, extra_tags: dict[str, str] | None = None,
               given_attack: tuple | None = None, role: str | None = None, parent_id: str | None = None,
               device=None) -> tuple[str, dict[str, float]]:
    """`bdo attack` / `bdo defend`: one top-level run, trained in this process (on `device`, else the default)."""
    tracker = session.open_tracker()
    device = device or pick_device()
    total = spec.config.get("epochs") if isinstance(spec.config.get("epochs"), int) else None
    progress = ProgressPrinter(spec.method, total, fault_hook(os.environ.get("BDO_FAULT"), None))
    if spec.kind == "attack":
        # through the attack cache, so a `bdo defend --attack` with the same settings reuses this model
        backdoor, run_id, key = build_attack(spec, tracker, session.storage, session.data_root, session.download,
                                             extra_tags=extra_tags, device=device, on_report=progress)
        if progress.steps == 0:  # nothing trained: the same settings were built before
            print(f"{spec.method}: the same attack is in the cache ({key}); its run is {run_id}")
        return run_id, backdoor.metrics
    if given_attack is not None:  # --attack-run: exactly that run's model (checked by attack_of_run)
        backdoor, key, attack_id = given_attack
    else:
        backdoor, attack_id, key = build_attack(spec, tracker, session.storage, session.data_root, session.download,
                                                device=device, on_report=ProgressPrinter(f"{spec.attack} (attack)",
                                                                                         spec.attack_config.get("epochs")))
    seeds = backdoor.seeds
    tags = {**base_tags(spec, role or "defense", seeds), "attack_run_id": attack_id,
            "attack_cache_key": key, **(extra_tags or {})}
    from orchestrator.cache import cache_key

    # everything that decides the defense's weights: a run killed mid-training is continued by the same command
    run_key = cache_key(spec.method, spec.config, {"data": spec.data_config, "attack_cache_key": key},
                        {"device": device.type, "fast": spec.fast_cfg().resolved(device)})
    with resumable_run(tracker, session.storage, "defense", run_key, f"{spec.method}-on-{spec.attack}", tags,
                       spec.flat_params(), parent_id) as (run_id, reporter, history):
        ctx = TrackedContext(device=device, run_id=run_id, tracker=tracker, reporter=reporter,
                             backdoor_obj=backdoor.to(device), data_root=session.data_root,
                             download=session.download, data_config=spec.data_cfg(), fast=spec.fast_cfg(),
                             on_report=progress, system_metrics=system_metrics_interval(), history=history)
        with tracker.ending(run_id):
            metrics, _ = execute_defense(spec, ctx, tracker, run_id, ctx.backdoor_obj)
    return run_id, metrics


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
        return ASHAScheduler(time_attr="step", max_t=max_t, grace_period=plan.space.grace_period,
                             reduction_factor=plan.space.reduction_factor)
    return FIFOScheduler()


def _search_alg(plan: SweepPlan, seed: int):
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    start = default_point(plan)
    points = [start] if start else None
    if plan.searcher != "optuna":
        # seeded like Optuna, so the same command samples the same trials. The generator limits concurrency itself:
        # Tune applies max_concurrent_trials only to a Searcher and ignored it here, with a warning per sweep.
        return BasicVariantGenerator(points_to_evaluate=points, random_state=seed,
                                     max_concurrent=plan.max_concurrent or 0)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    if plan.objective == "pareto":
        metric = [m for m, _ in PARETO_METRICS]
        mode = [d for _, d in PARETO_METRICS]
        alg = OptunaSearch(metric=metric, mode=mode, points_to_evaluate=points,
                           sampler=optuna.samplers.TPESampler(seed=seed))
    else:
        alg = OptunaSearch(metric=plan.tune_metric, mode=plan.tune_mode, points_to_evaluate=points,
                           sampler=optuna.samplers.TPESampler(seed=seed))
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


def sweep_attack(session: Session, plan: SweepPlan, tracker: Tracker,
                 extra_tags: dict[str, str] | None) -> tuple[str, str, dict[str, float]]:
    """The attack a defense sweep's trials start from, built where its trials train (orchestrator/placement.py):
    (its run id, its cache key, its metrics). A cached one is read, not rebuilt, wherever it is placed."""
    from orchestrator.placement import get_task, placement, session_fields, submit_task

    where = placement(plan)
    if not where.in_task:
        backdoor, run_id, key = build_attack(plan.base, tracker, session.storage, session.data_root,
                                             session.download, extra_tags=extra_tags, device=driver_device(plan))
        return run_id, key, backdoor.metrics
    print(f"attack {plan.base.attack}: building (or reading from the cache) {where.describe()}", flush=True)
    ref = submit_task(where, session_fields(session), "attack", plan.base, extra_tags or {}, None, where.device,
                      where.threads)
    run_id, metrics, seconds, key = get_task(ref)
    print(f"attack {plan.base.attack}: run {run_id}, test_acc={metrics.get('test_acc', math.nan):.3f} "
          f"test_asr={metrics.get('test_asr', math.nan):.3f} ({seconds:.0f} s)", flush=True)
    return run_id, key, metrics


def run_sweep(session: Session, plan: SweepPlan, extra_tags: dict[str, str] | None = None,
              parent_id: str | None = None, resume_run_id: str | None = None,
              max_failures: int = 1) -> SweepResult:
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
        tags = {**base_tags(spec, "sweep", seeds), "space": str(plan.space.path),
                "space_sha256": space_fingerprint(plan),
                "searcher": plan.searcher, "scheduler": plan.scheduler, "objective": plan.objective,
                "objective_metric": plan.space.metric, "objective_mode": plan.space.mode,
                "objective_rule": plan.objective_text, "tune_metric": plan.tune_metric,
                "knowledge": plan.knowledge,
                "gpus_per_trial": f"{plan.gpus_per_trial:g}",
                "storage": str(session.storage), **(extra_tags or {})}
        if attack_run_id:
            tags["attack_run_id"], tags["attack_cache_key"] = attack_run_id, cache_key
        sweep_run_id = tracker.start_run(f"sweep-{spec.method}", tags, parent_id)
        tracker.log_params(sweep_run_id, {**spec.flat_params(),
                                          **{f"space.{d.key}": f"{d.kind} {d.args}" for d in plan.tuned},
                                          "num_samples": plan.num_samples})
        tune_path = str(tune_root / f"{spec.method}-{sweep_run_id[:12]}")
        tracker.set_tags(sweep_run_id, {"tune_path": tune_path})

    setup = TrialSetup(plan=plan, tracking_uri=tracker.uri, experiment_id=tracker.experiment_id,
                       sweep_run_id=sweep_run_id, storage=str(session.storage), cache_key=cache_key,
                       attack_run_id=attack_run_id, data_root=str(session.data_root), download=session.download,
                       tags={**(extra_tags or {}), "knowledge": plan.knowledge}, max_failures=max_failures,
                       fault=os.environ.get("BDO_FAULT"), system_metrics=system_metrics_interval(),
                       reference_acc=reference_acc)
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
                    raise BadInput(f"--resume {resume_run_id}: its Tune state at {tune_path} is missing; "
                                   "start a new sweep")
                tuner = tune.Tuner.restore(tune_path, trainable, resume_unfinished=True, resume_errored=True)
            else:
                tuner = tune.Tuner(
                    trainable,
                    param_space=tune_param_space(plan),
                    tune_config=tune.TuneConfig(
                        metric=plan.tune_metric if single else None, mode=plan.tune_mode if single else None,
                        search_alg=_search_alg(plan, spec.config.get("seed", 0) or 0), scheduler=_scheduler(plan),
                        num_samples=plan.num_samples,  # concurrency: set on the search algorithm (_search_alg)
                        # the next trial runs in a finished trial's process: no new Python importing torch and mlflow
                        # per trial (on 2 cores that cost ~14 s of trial-slot time per trial; benchmarks sweep.reuse)
                        reuse_actors=True,
                    ),
                    run_config=tune.RunConfig(
                        name=Path(tune_path).name, storage_path=str(tune_root), callbacks=callbacks,
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


def summarize(tracker: Tracker, plan: SweepPlan, sweep_run_id: str, grid, interrupted: bool = False,
              reference_acc: float | None = None) -> SweepResult:
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
        row = {"trial_id": metrics.get("trial_id", trial_id), "config": result.config,
               "error": result.error is not None,
               # Tune marks a trial's last result done when the trial returned or its scheduler stopped it
               "cut": interrupted and result.error is None and not metrics.get("done"),
               **{k: v for k, v in metrics.items() if k.startswith(("val_", "test_"))},
               **{k: metrics.get(k, math.nan) for k in (*TRIAL_COLUMNS, *objective_keys)},
               "step": metrics.get("step")}
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
                print(f"{plan.base.method}: no trial met {bounds}; selected the one closest to it, "
                      f"{best['trial_id']} (best_feasible=false on the sweep run)", flush=True)
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
            (Path(d) / "pareto.json").write_text(json.dumps(
                [{k: t[k] for k in ("trial_id", "run_id", "val_acc", "val_asr", "config")} for t in front],
                indent=1, default=str))
            plot_dir = Path(d) / "plots"
            plot_dir.mkdir()
            pareto_png(plot_dir / "pareto.png", points)
            tracker.log_artifact(sweep_run_id, Path(d) / "pareto.json")
            tracker.log_artifact(sweep_run_id, plot_dir, "plots")
    return out


def best_trial(trials: list[dict[str, Any]], metric: str, mode: str,
               constraints: dict[str, float] | None = None) -> dict[str, Any] | None:
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
        study.add_trial(optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params},
                                                  value=value))
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


def log_trials_csv(tracker: Tracker, sweep_run_id: str, trials: list[dict[str, Any]], metric: str,
                   extra: tuple[str, ...] = ()) -> None:
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
                writer.writerow([t["trial_id"], t["run_id"] or "", "FAILED" if t["error"] else "done", t["step"],
                                 *(_metric(t, c) for c in columns), *(t["config"].get(k, "") for k in keys)])
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
    query = (f"tags.role = 'sweep' and tags.space_sha256 = '{space_fingerprint(plan)}' "
             f"and tags.storage = '{storage}' and attributes.status != 'FINISHED'")
    runs = tracker.search(query)
    if not runs:
        raise BadInput(f"--resume: no unfinished sweep of {plan.space.path} in this experiment and storage; "
                       "start one without --resume")
    return runs[0].info.run_id


def format_trials(result: SweepResult, metric: str) -> str:
    columns = tuple(dict.fromkeys((metric, *result.constraints, *TRIAL_COLUMNS))) \
        if metric not in TRIAL_COLUMNS or result.constraints else TRIAL_COLUMNS
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
