"""The run context: the only way a method talks to the world.

A method's `run(ctx, cfg)` trains on `ctx.device`, reports metrics with `ctx.report`, checkpoints with
`ctx.save_state` / `ctx.load_state` (both through methods.core.engine, which owns the step numbering and the
resume), and hands per-sample arrays and per-epoch series over with `ctx.hand_off`
/ `ctx.hand_off_series`. Defenses get their backdoored model and poisoned data from `ctx.backdoor()`.
The orchestrator implements this on Ray Tune/Train and MLflow; `LocalContext` implements it in memory for
tests and for plain scripts. Nothing here imports ray or mlflow.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from methods.core.blind_signals import BlindSignals
from methods.core.config import Config
from methods.core.fastpath import accelerate
from methods.core.fastpath_config import FastPath
from methods.core.training import default_device


class StopRun(Exception):
    """Raised by a context to stop a run early (a test's simulated interruption, a scheduler's stop)."""


class BackdoorArtifact(Protocol):
    """What `ctx.backdoor()` hands a defense: a trained suspect model with the data it was trained on.

    methods.attacks.base.Backdoor is the one implementation. The contract is stated here, at the bottom layer,
    because the context only carries the artifact and core may not import the attacks that make it."""

    attack: str
    config: dict[str, Any]
    data: Any  # methods.attacks.base.PoisonedData
    model_name: str
    model_state: dict[str, torch.Tensor]
    metrics: dict[str, float]
    seeds: dict[str, int]
    blind: BlindSignals | None

    def build_model(self, device: torch.device | str = "cpu") -> torch.nn.Module: ...

    def to(self, device: torch.device) -> BackdoorArtifact: ...


@runtime_checkable
class RunContext(Protocol):
    device: torch.device
    rank: int
    world_size: int
    data_root: Path
    download: bool
    # The dataset's options (methods.data.configs.DataConfig); None: its defaults.
    data_config: Config | None

    def report(self, metrics: dict[str, float], step: int) -> None: ...

    def save_state(self, state: dict[str, Any]) -> None: ...

    def load_state(self) -> dict[str, Any] | None: ...

    def hand_off(self, name: str, table: dict[str, np.ndarray]) -> None: ...

    def hand_off_series(self, name: str, series: dict[str, list[float]]) -> None: ...

    def backdoor(self) -> BackdoorArtifact: ...

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to train with: the fast path's wrapper where it applies (methods.core.fastpath), inside
        DistributedDataParallel when world_size > 1; the model itself on one CPU worker."""

    def progress(self, message: str) -> None: ...

    def expect_steps(self, total: int) -> None:
        """The number of steps the run's stages report in all, for progress displays (the engine calls it before
        the first step, and again when a stage's length changes, as a rerun of PBE's step 0 lengthens its run); a
        method's final report may follow at total + 1 (methods.defenses.shared.common.final_result)."""


def serialize_state(state: dict[str, Any]) -> bytes:
    """Full-state checkpoint to bytes. Loads back with weights_only=True: no code runs on load."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds something other than tensors and plain containers (e.g. a pickled object)."""


def deserialize_state(blob: bytes) -> dict[str, Any]:
    """Load a checkpoint without executing code: torch's weights_only unpickler refuses any object that is not
    a tensor, a number, a string or a plain container, so a planted pickle payload never runs."""
    try:
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafeCheckpointError(f"refusing to load a checkpoint that carries executable objects: {first}") from None


@dataclass
class LocalContext:
    """In-memory context: reports go to a list, checkpoints to bytes, hand-offs to dicts.

    `stop_after_step` raises StopRun after that step's report and checkpoint, which tests use to simulate an
    interruption; a new LocalContext built with `checkpoint=` of the old one resumes it.
    """

    device: torch.device = field(default_factory=default_device)
    rank: int = 0
    world_size: int = 1
    data_root: Path = field(default_factory=lambda: Path.home() / ".cache" / "bdo" / "data")
    download: bool = False
    data_config: Config | None = None
    backdoor_provider: Callable[[], BackdoorArtifact] | None = None
    stop_after_step: int | None = None
    checkpoint: bytes | None = None
    reports: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    hand_offs: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    series: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    verbose: bool = False
    fast: FastPath | None = None  # None: the defaults (on for CUDA, off for CPU)
    expected_steps: int | None = None

    def report(self, metrics: dict[str, float], step: int) -> None:
        self.reports.append((step, {k: float(v) for k, v in metrics.items()}))
        if self.verbose:
            shown = " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
            print(f"[step {step}] {shown}", flush=True)

    def save_state(self, state: dict[str, Any]) -> None:
        self.checkpoint = serialize_state(state)
        step = state.get("step", state.get("epoch"))
        if self.stop_after_step is not None and step is not None and step >= self.stop_after_step:
            raise StopRun(f"stopped after step {step}")

    def load_state(self) -> dict[str, Any] | None:
        return None if self.checkpoint is None else deserialize_state(self.checkpoint)

    def hand_off(self, name: str, table: dict[str, np.ndarray]) -> None:
        lengths = {len(v) for v in table.values()}
        if len(lengths) > 1:
            raise ValueError(f"hand-off {name!r}: columns differ in length {sorted(lengths)}")
        self.hand_offs[name] = {k: np.asarray(v) for k, v in table.items()}

    def hand_off_series(self, name: str, series: dict[str, list[float]]) -> None:
        self.series[name] = copy.deepcopy(series)

    def backdoor(self) -> BackdoorArtifact:
        if self.backdoor_provider is None:
            raise RuntimeError("this context has no backdoored model; pass backdoor_provider=")
        return self.backdoor_provider()

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return accelerate(model, self.device, self.fast)

    def progress(self, message: str) -> None:
        if self.verbose:
            print(message, flush=True)

    def expect_steps(self, total: int) -> None:
        self.expected_steps = total

    def last(self, key: str) -> float:
        """The last reported value of a metric."""
        for _, metrics in reversed(self.reports):
            if key in metrics:
                return metrics[key]
        raise KeyError(f"metric {key!r} was never reported")
