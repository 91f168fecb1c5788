"""The Ray/MLflow implementation of the methods' run context.

A method calls report(...) then save_state(...) each epoch; the context logs the metrics to MLflow in one
batched call and hands metrics plus a checkpoint directory to the reporter (Ray Tune, Ray Train, or a local
progress bar) together, so a retried trial resumes from exactly the step MLflow last saw.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from methods.core.fastpath_config import FastPath
from methods.data.configs import DataConfig

# torch is imported where a run uses it, not here: the CLI imports this module (through runner) to validate input
if TYPE_CHECKING:  # pragma: no cover
    import torch

    from methods.attacks.base import Backdoor

STATE_FILE = "state.pt"


def atomic_write_bytes(path: Path, blob: bytes) -> None:
    """Write, flush to disk, then rename: a kill never leaves a half-written file that reads as good."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_parquet_atomic(path: Path, table: dict[str, np.ndarray]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    pq.write_table(pa.table({k: np.asarray(v) for k, v in table.items()}), tmp)
    os.replace(tmp, path)


class Reporter:
    """Where reports and checkpoints go besides MLflow. The base class keeps them in memory (plain runs)."""

    def __init__(self) -> None:
        self.state: bytes | None = None

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is not None:
            self.state = (checkpoint_dir / STATE_FILE).read_bytes()

    def get_state(self) -> bytes | None:
        return self.state


class TuneReporter(Reporter):
    def report(self, metrics, checkpoint_dir):
        from ray import tune

        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        tune.report(metrics, checkpoint=checkpoint)

    def get_state(self):
        from ray import tune

        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            return (Path(d) / STATE_FILE).read_bytes()


class TrainReporter(Reporter):
    """Inside a Ray Train worker: every rank reports (a barrier); only rank 0 attaches the checkpoint."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def report(self, metrics, checkpoint_dir):
        import ray.train

        checkpoint = None
        if checkpoint_dir is not None and self.rank == 0:
            checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir))
        ray.train.report(metrics, checkpoint=checkpoint)

    def get_state(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            return (Path(d) / STATE_FILE).read_bytes()


@dataclass
class TrackedContext:
    """RunContext on MLflow (rank 0 logs) plus a Reporter."""

    device: torch.device
    run_id: str | None
    tracker: Any | None
    reporter: Reporter
    backdoor_obj: Backdoor | None = None
    rank: int = 0
    world_size: int = 1
    data_root: Path = field(default_factory=lambda: Path.home() / ".cache" / "bdo" / "data")
    download: bool = False
    data_config: DataConfig = field(default_factory=DataConfig)
    fast: FastPath = field(default_factory=FastPath)
    on_report: Callable[[int, dict[str, float]], None] | None = None
    system_metrics: float = 0.0  # seconds between MLflow system-metrics samples of this run; 0: none
    # metrics the orchestrator adds to every report from the reported ones (a sweep trial's val_acc_drop and
    # val_objective, orchestrator/objective.py); logged and reported with them
    derive: Callable[[dict[str, float]], dict[str, float]] | None = None
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    # steps the run already holds in MLflow: a reopened run (a retried or resumed trial) whose last attempt was cut
    # after logging a step but before checkpointing it trains that step again and must not log it twice; resume
    # is bit-identical, so the values logged first stand for it
    logged_through: int = 0
    resumed_at: int = 0  # the step of the checkpoint this attempt started from (load_state); 0: from scratch
    tables: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    series: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    _pending: tuple[int, dict[str, float]] | None = None
    _ddp_models: list = field(default_factory=list)

    @property
    def logs(self) -> bool:
        return self.rank == 0 and self.tracker is not None and self.run_id is not None

    def report(self, metrics: dict[str, float], step: int) -> None:
        self._sync_buffers()
        self.flush()
        clean = {k: float(v) for k, v in metrics.items()}
        if self.derive is not None:
            clean.update(self.derive(clean))
        self._pending = (int(step), clean)

    def _send(self, checkpoint_dir: Path | None) -> None:
        if self._pending is None:
            return
        step, metrics = self._pending
        self._pending = None
        self.history.append((step, metrics))
        if self.logs and step > self.logged_through:
            self.tracker.log_metrics(self.run_id, metrics, step)
        if self.on_report is not None and self.rank == 0:
            self.on_report(step, metrics)
        self.reporter.report({**metrics, "step": step}, checkpoint_dir)

    def flush(self) -> None:
        """Send a report that no checkpoint followed."""
        self._send(None)

    def save_state(self, state: dict[str, Any]) -> None:
        from methods.core.context import serialize_state

        blob = serialize_state(state)
        with tempfile.TemporaryDirectory(prefix="bdo-ckpt-") as d:
            atomic_write_bytes(Path(d) / STATE_FILE, blob)
            if self._pending is None:  # a checkpoint without a new report: attach it to a repeat of the last
                step, metrics = self.history[-1] if self.history else (0, {})
                self.reporter.report({**metrics, "step": step}, Path(d))
            else:
                self._send(Path(d))

    def load_state(self) -> dict[str, Any] | None:
        from methods.core.context import deserialize_state

        blob = self.reporter.get_state()
        if blob is None:
            return None
        state = deserialize_state(blob)
        self.resumed_at = int(state["step"])
        if self.logs:  # where this attempt picked up (a retried or resumed trial, a continued plain run)
            self.tracker.set_tags(self.run_id, {"resumed_at_step": str(int(state["step"]))})
        return state

    def hand_off(self, name: str, table: dict[str, np.ndarray]) -> None:
        self.tables[name] = {k: np.asarray(v) for k, v in table.items()}

    def hand_off_series(self, name: str, series: dict[str, list[float]]) -> None:
        self.series[name] = {k: list(v) for k, v in series.items()}

    def backdoor(self) -> Backdoor:
        if self.backdoor_obj is None:
            raise RuntimeError("this run has no backdoored model (attacks build their own)")
        return self.backdoor_obj

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from methods.core.fastpath import accelerate

        fast = accelerate(model, self.device, self.fast)
        if self.world_size <= 1:
            return fast
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        self._ddp_models.append(model)
        return DistributedDataParallel(fast, device_ids=ids)

    def _sync_buffers(self) -> None:
        """Average BatchNorm running statistics across ranks at every report: DDP keeps parameters identical but
        each rank's last forward passes update its own buffers (SyncBatchNorm does not run on CPU), so without
        this the ranks would end with different models."""
        if self.world_size <= 1 or not self._ddp_models:
            return
        import torch
        import torch.distributed as dist

        with torch.no_grad():
            for model in self._ddp_models:
                for buffer in model.buffers():
                    if buffer.is_floating_point():
                        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
                        buffer.div_(self.world_size)
                    else:
                        dist.broadcast(buffer, src=0)

    def progress(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def expect_steps(self, total: int) -> None:
        # a single run's progress printer shows it (orchestrator.console.ProgressPrinter); a trial's hook has none
        expect = getattr(self.on_report, "expect_steps", None)
        if expect is not None and self.rank == 0:
            expect(total)
