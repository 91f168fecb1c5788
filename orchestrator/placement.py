"""Where an attack build and a study's final run train: where the trials train.

On one machine that is the driver (this process, or a study's worker processes), whose GPU is the machine's. On a
cluster the driver runs on the head, which cluster.yaml makes a CPU-only instance while the GPUs wait on the
workers, and inside a Ray job it inherits OMP_NUM_THREADS=1: a sweep's attack built there trains on one CPU
thread. So on a cluster of more than one node, or when the trials want a GPU this process cannot see, such a run
is a Ray task with one trial's resources (cpus_per_trial CPUs and the trial's GPU share), placed by Ray as a trial
is. Its model reaches the trials through the attack cache on the shared storage (Session refuses storage other
nodes cannot see), and a second driver building the same key waits on the cache's lock and reuses the first's.
"""

from __future__ import annotations

import contextlib
import io
import math
import multiprocessing
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from orchestrator.devices import ClusterShape, driver_device_name, resolve_gpus
from orchestrator.signals import catch_stop_signals


@dataclass(frozen=True)
class Placement:
    """`in_task`: a Ray task with `cpus` CPUs and `gpus` GPUs, training on `device`; else this process (or the
    study's worker processes) on `device`."""

    in_task: bool
    device: str
    cpus: float = 1.0
    gpus: float = 0.0

    @property
    def threads(self) -> int:
        """The torch threads of a run in a task: its whole CPUs, at least one."""
        return max(1, int(self.cpus))

    def describe(self) -> str:
        if not self.in_task:
            return f"in this process on {self.device}"
        gpus = f", {self.gpus:g} GPU" if self.gpus else ""
        return f"in a Ray task ({self.cpus:g} CPU{gpus}) on a node Ray picks"


def placement(plan) -> Placement:
    """Where the runs of `plan` (a sweep's attack build, a study's builds and final runs) train."""
    import ray

    from methods.core.hardware import visible_gpu_count

    if not ray.is_initialized():  # a study whose defenses all run untuned starts no Ray
        return Placement(False, driver_device_name(plan))
    shape = ClusterShape.from_ray()
    gpus = resolve_gpus(plan, shape).gpus_per_trial
    if len(shape.node_cpus) > 1 or (gpus > 0 and visible_gpu_count() == 0):
        return Placement(True, "cuda" if gpus > 0 else "cpu", float(plan.cpus_per_trial), float(gpus))
    return Placement(False, driver_device_name(plan))


def train_run(
    session_fields: dict[str, Any],
    job: str,
    spec,
    tags: dict[str, str],
    parent_id: str | None,
    device: str,
    threads: int | None,
    quiet: bool = False,
) -> tuple[str, dict[str, float], float, str | None]:
    """One attack build (`job` "attack") or final run ("final"), with its own tracker; `threads` torch threads
    where given, its progress lines dropped when `quiet`. Returns (run id, metrics, seconds it ran, the attack's
    cache key or None): a queued run's wait for a free worker is not its time."""
    import torch

    from orchestrator.execute import build_attack, run_single
    from orchestrator.session import Session

    started = time.monotonic()
    session = Session(**session_fields)
    if threads:
        torch.set_num_threads(threads)
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        if job == "attack":
            backdoor, run_id, key = build_attack(
                spec,
                session.open_tracker(),
                session.storage,
                session.data_root,
                session.download,
                extra_tags=tags,
                device=torch.device(device),
            )
            return run_id, backdoor.metrics, time.monotonic() - started, key
        run_id, metrics = run_single(
            session, spec, extra_tags=tags, role="final", parent_id=parent_id, device=torch.device(device)
        )
    return run_id, metrics, time.monotonic() - started, None


def _train_in_task(session_fields, job, spec, tags, parent_id, device, threads):
    """train_run inside a Ray task: the run records the node it trained on, as a trial's run does."""
    import ray

    tags = {**tags, "ray_node_id": ray.get_runtime_context().get_node_id()}
    return train_run(session_fields, job, spec, tags, parent_id, device, threads)


def submit_task(where: Placement, *args) -> Any:
    """train_run(*args) as a Ray task placed by `where`; its ObjectRef."""
    import ray

    task = ray.remote(_train_in_task).options(num_cpus=where.cpus, num_gpus=where.gpus, name=f"bdo-{args[1]}")
    return task.remote(*args)


def get_task(ref) -> Any:
    """The task's result; a stop signal (or any other exception) while waiting cancels it, so that its run ends
    KILLED in the task (Ray raises KeyboardInterrupt there) instead of training on after the driver is gone."""
    import ray

    try:
        return ray.get(ref)
    except BaseException:
        ray.cancel(ref)
        raise


def session_fields(session) -> dict[str, Any]:
    """What a run trained elsewhere (a worker process, a Ray task) needs of the driver's Session."""
    return {
        "tracking_uri": session.tracking_uri,
        "experiment": session.experiment,
        "storage": session.storage,
        "data_root": session.data_root,
        "download": session.download,
        "shared_storage": session.shared_storage,
    }


class RunPool:
    """Trains a study's attack builds and final runs: as Ray tasks where placement() says so (all of them at once,
    Ray queues what the cluster cannot hold), else `jobs` at a time in spawned worker processes (each with an equal
    share of the CPU threads), or one after the other in this process when jobs is 1. A run that fails is reported
    in one line and counted; the others go on."""

    def __init__(self, session, jobs: int) -> None:
        self.fields = session_fields(session)
        self.threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
        self.executor = None
        self.tasks: list[Any] = []
        if jobs > 1:
            # the workers share bdo's process group, so a stop signal reaches them too: their runs end KILLED
            self.executor = ProcessPoolExecutor(
                jobs, mp_context=multiprocessing.get_context("spawn"), initializer=catch_stop_signals
            )

    def submit(
        self, label: str, job: str, spec, tags: dict[str, str], plan, parent_id: str | None = None
    ) -> tuple[str, Any]:
        where = placement(plan)
        if where.in_task:
            ref = submit_task(where, self.fields, job, spec, tags, parent_id, where.device, where.threads)
            self.tasks.append(ref)
            return label, ref
        args = (self.fields, job, spec, tags, parent_id, where.device, self.threads)
        if self.executor is not None:
            return label, self.executor.submit(train_run, *args, quiet=True)
        future: Future = Future()
        try:
            future.set_result(train_run(*args))
        except Exception as exc:  # noqa: BLE001  (reported by wait, like a worker's failure)
            future.set_exception(exc)
        return label, future

    def wait(self, job: tuple[str, Any]) -> tuple[str, dict[str, float]] | None:
        label, pending = job
        in_task = not isinstance(pending, Future)
        try:
            run_id, metrics, seconds, _ = get_task(pending) if in_task else pending.result()
        except Exception as exc:  # noqa: BLE001
            print(f"  {label}: FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            return None
        if self.executor is not None or in_task:  # in this process the run printed its own progress
            print(
                f"  {label}: test_acc={metrics.get('test_acc', math.nan):.3f} "
                f"test_asr={metrics.get('test_asr', math.nan):.3f} ({seconds:.0f} s)"
            )
        return run_id, metrics

    def shutdown(self, cancel: bool = False) -> None:
        if cancel and self.tasks:
            import ray

            for ref in self.tasks:
                ray.cancel(ref)
        if self.executor is not None:
            self.executor.shutdown(wait=not cancel, cancel_futures=cancel)
