"""The Tune function trainable. One trial either trains in-process (one worker) or drives a Ray Train
TorchTrainer with `workers_per_trial` workers whose reports it forwards to Tune; both run the same methods/
code through TrackedContext. Ray 2.60 runs Train V2, where Tuner(TorchTrainer) fails, hence this shape."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.cache import AttackCache
from orchestrator.context import TrackedContext, TrainReporter, TuneReporter
from orchestrator.devices import pick_device
from orchestrator.execute import execute_attack, execute_defense, fault_hook, weights_digest
from orchestrator.objective import TrialObjective
from orchestrator.resolve import RunSpec
from orchestrator.spaces import SweepPlan, trial_values
from orchestrator.tracking import Tracker


@dataclass
class TrialSetup:
    """Everything a trial needs; shipped to trials with tune.with_parameters."""

    plan: SweepPlan
    tracking_uri: str
    experiment_id: str
    sweep_run_id: str
    storage: str
    cache_key: str | None
    attack_run_id: str | None
    data_root: str
    download: bool
    tags: dict[str, str] = field(default_factory=dict)
    max_failures: int = 1
    fault: str | None = None
    system_metrics: float = 0.0  # read on the driver, so a trial follows the command's setting
    # the suspect (backdoored) model's validation ACC, the reference of val_acc_drop (orchestrator/objective.py)
    reference_acc: float | None = None


def trial_objective(setup: TrialSetup, spec: RunSpec) -> TrialObjective | None:
    """What a defense trial adds to each report: val_acc_drop, and val_objective under a constraint."""
    if spec.kind != "defense":
        return None
    plan = setup.plan
    return TrialObjective(setup.reference_acc, plan.space.metric, plan.space.mode, plan.constraints)


def trial_spec(setup: TrialSetup, sampled: dict[str, Any]) -> RunSpec:
    base = setup.plan.base
    values = trial_values(setup.plan, sampled)
    attack_config = values if base.kind == "attack" else base.attack_config
    return RunSpec(
        base.method,
        base.kind,
        values,
        base.attack,
        attack_config,
        base.data_config,
        base.presets,
        base.recipe,
        base.fast_config,
    )


def trial_index(trial_id: str) -> int | None:
    tail = trial_id.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else None


def child_run(
    tracker: Tracker, setup: TrialSetup, spec: RunSpec, trial_id: str, trial_name: str
) -> tuple[str, dict[str, str]]:
    """The trial's MLflow run: reopened when the trial is retried or resumed, so each trial has one run. Returns
    its id and, for a reopened run, its tags so far (empty for a new run)."""
    existing = tracker.children(setup.sweep_run_id, f"tags.trial_id = '{trial_id}'")
    if existing:
        run_id = existing[0].info.run_id
        tracker.client.update_run(run_id, status="RUNNING")
        return run_id, dict(existing[0].data.tags)
    from orchestrator.execute import base_tags

    seeds = spec.attack_cfg().seeds()
    tags = {**base_tags(spec, "trial", seeds), "trial_id": trial_id, "sweep_run_id": setup.sweep_run_id, **setup.tags}
    if setup.attack_run_id:
        tags["attack_run_id"] = setup.attack_run_id
    if setup.cache_key:
        tags["attack_cache_key"] = setup.cache_key
    run_id = tracker.start_run(trial_name, tags, parent_id=setup.sweep_run_id)
    tracker.log_params(run_id, spec.flat_params())
    return run_id, {}


def attempt_tags(previous: dict[str, str], node_id: str, node_ip: str) -> dict[str, str]:
    """The tags of a trial's attempt, from the tags its reopened run has so far (`previous`: empty for a new run):
    the attempt number (`attempt`, 1 then one more on each retry or resume), the node it runs on (`node`, Ray's node
    id, since several nodes may share one host, and `node_ip`), and the same per attempt (`attempt_N_node`,
    `attempt_N_node_ip`), so the run keeps where every attempt ran. A run that has tags but no `attempt` was
    opened by a bdo that did not count attempts: its first attempt is taken as attempt 1."""
    last = previous.get("attempt", "")
    attempt = int(last) + 1 if last.isdigit() else 2 if previous else 1
    return {
        "attempt": str(attempt),
        "node": node_id,
        "node_ip": node_ip,
        "ray_node_id": node_id,
        f"attempt_{attempt}_node": node_id,
        f"attempt_{attempt}_node_ip": node_ip,
    }


def _backdoor(setup: TrialSetup):
    if setup.cache_key is None:
        return None
    backdoor = AttackCache(Path(setup.storage)).load(setup.cache_key)
    if backdoor is None:
        raise RuntimeError(f"attack cache entry {setup.cache_key} is missing or corrupt in {setup.storage}")
    return backdoor


def _quiet_checkpoint_logs() -> None:
    """Ray logs a line per persisted checkpoint, i.e. per epoch of every trial; the path is in the run's records."""
    import logging

    for name in ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage"):
        logging.getLogger(name).setLevel(logging.WARNING)


def tune_trainable(config: dict[str, Any], setup: TrialSetup) -> None:
    from ray import tune

    _quiet_checkpoint_logs()
    context = tune.get_context()
    trial_id, trial_name = context.get_trial_id(), context.get_trial_name()
    spec = trial_spec(setup, config)
    tracker = Tracker(setup.tracking_uri, experiment_id=setup.experiment_id)
    run_id, previous = child_run(tracker, setup, spec, trial_id, trial_name)
    # Set on every attempt (Tune's retry after a lost node or a killed process, or a --resume), so a trial retried
    # elsewhere names the node it finished on and keeps the node of each earlier attempt (attempt_tags).
    import ray

    tracker.set_tags(
        run_id, attempt_tags(previous, ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address())
    )
    # Tune ends a stopped trial's thread (ASHA, or its reused actor being reset) with sys.exit at the next report;
    # that is no failure, and the driver's callback and summary give the run its status.
    logged = tracker.logged_through(run_id) if previous else 0  # what a cut attempt logged (TrackedContext)
    with tracker.ending(run_id, leave=(SystemExit,)):
        if setup.plan.workers_per_trial > 1:
            _drive_train(setup, config, run_id, trial_id, logged)
        else:
            device = pick_device(setup.plan.gpus_per_trial)
            backdoor = _backdoor(setup)
            ctx = TrackedContext(
                device=device,
                run_id=run_id,
                tracker=tracker,
                reporter=TuneReporter(),
                backdoor_obj=None if backdoor is None else backdoor.to(device),
                data_root=Path(setup.data_root),
                download=setup.download,
                data_config=spec.data_cfg(),
                fast=spec.fast_cfg(),
                on_report=fault_hook(setup.fault, trial_index(trial_id)),
                system_metrics=setup.system_metrics,
                derive=trial_objective(setup, spec),
                logged_through=logged,
            )
            if spec.kind == "attack":
                execute_attack(spec, ctx, tracker, run_id)
            else:
                execute_defense(spec, ctx, tracker, run_id, ctx.backdoor_obj)


def _drive_train(setup: TrialSetup, config: dict[str, Any], run_id: str, trial_id: str, logged_through: int) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    plan = setup.plan
    n = plan.workers_per_trial
    per_worker = {"CPU": max(plan.cpus_per_trial / n, 0.01)}
    if plan.gpus_per_trial > 0:
        per_worker["GPU"] = plan.gpus_per_trial / n
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "setup": setup,
            "config": config,
            "run_id": run_id,
            "trial_id": trial_id,
            "logged_through": logged_through,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=n, use_gpu=plan.gpus_per_trial > 0, resources_per_worker=per_worker
        ),
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}",
            storage_path=str(Path(setup.storage) / "train"),
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=setup.max_failures),
        ),
    )
    trainer.fit()


def train_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: rank 0 logs to MLflow; every rank trains (DDP through ctx.wrap_model)."""
    import ray.train
    import torch

    setup: TrialSetup = loop_config["setup"]
    _quiet_checkpoint_logs()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    spec = trial_spec(setup, loop_config["config"])
    device = (
        torch.device("cuda", context.get_local_rank())
        if (setup.plan.gpus_per_trial > 0 and torch.cuda.is_available())
        else torch.device("cpu")
    )
    tracker = Tracker(setup.tracking_uri, experiment_id=setup.experiment_id) if rank == 0 else None
    backdoor = _backdoor(setup)
    ctx = TrackedContext(
        device=device,
        run_id=loop_config["run_id"] if rank == 0 else None,
        tracker=tracker,
        reporter=TrainReporter(rank),
        backdoor_obj=None if backdoor is None else backdoor.to(device),
        rank=rank,
        world_size=world,
        data_root=Path(setup.data_root),
        download=setup.download,
        data_config=spec.data_cfg(),
        fast=spec.fast_cfg(),
        on_report=fault_hook(setup.fault, trial_index(loop_config["trial_id"])),
        system_metrics=setup.system_metrics,
        derive=trial_objective(setup, spec),
        logged_through=loop_config["logged_through"],
    )
    if spec.kind == "attack":
        _, state = execute_attack(spec, ctx, tracker, ctx.run_id)
    else:
        _, state = execute_defense(spec, ctx, tracker, ctx.run_id, ctx.backdoor_obj)
    # every rank's final weights must agree under DDP; rank 0 records whether they did
    import torch.distributed as dist

    digest = weights_digest(state)
    digests = [None] * world
    dist.all_gather_object(digests, digest)
    if rank == 0:
        tracker.set_tags(
            ctx.run_id,
            {
                "ddp_world_size": world,
                "ddp_weights_identical": str(len(set(digests)) == 1).lower(),
                "weights_sha256": digest,
            },
        )
