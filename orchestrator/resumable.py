"""Plain runs (`bdo attack`, `bdo defend`, an attack build, a study's final run) that the same command resumes.

A trial's checkpoints live in Tune's storage and `bdo tune --resume` continues from them; a plain run kept its
checkpoints in memory, so a kill -9 lost them (the same command started again from step 1) and left the run
RUNNING in MLflow for ever. Here each plain run checkpoints into <storage>/partial/<kind>-<key>/ (key: the content
hash of everything that decides its weights), under a lock that names its holder. The same command finds that
folder when the last holder died (the lock is stale: its process is gone, or its heartbeat lapsed on another host)
and continues from the checkpoint into a new run, which starts with the old run's metrics up to the checkpoint;
the old run is closed KILLED, and the two are linked (`continued_by_run` on the old, `resumed_from_run` and
`resumed_at_step` on the new). The folder goes when the run finishes or fails (a failure is not resumed: its cause
may be in the code), and stays when it is interrupted, so Ctrl-C and a stop signal resume the same way.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from orchestrator.context import STATE_FILE, Reporter, atomic_write_bytes

RUN_FILE = "run.json"


class DiskReporter(Reporter):
    """Checkpoints on disk instead of in memory, with the step each one closes (step.json)."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is None:
            return
        atomic_write_bytes(self.folder / STATE_FILE, (checkpoint_dir / STATE_FILE).read_bytes())
        atomic_write_bytes(self.folder / "step.json", json.dumps({"step": int(metrics["step"])}).encode())

    def get_state(self) -> bytes | None:
        path = self.folder / STATE_FILE
        return path.read_bytes() if path.is_file() else None

    def step(self) -> int:
        """The step the checkpoint on disk closes; 0 without one."""
        try:
            return int(json.loads((self.folder / "step.json").read_text())["step"])
        except (OSError, ValueError, KeyError):
            return 0


def copy_history(tracker, source: str, target: str, through: int) -> list[tuple[int, dict[str, float]]]:
    """The metrics `source` logged at steps 1..through, logged again on `target`; returned as a context's history.
    Later steps are left: the killed run logged them before it could checkpoint them, and the resumed run
    trains them again (bit-identically) and logs them itself."""
    by_step: dict[int, dict[str, float]] = {}
    for key in tracker.client.get_run(source).data.metrics:
        for measure in tracker.client.get_metric_history(source, key):
            if 1 <= measure.step <= through:
                by_step.setdefault(measure.step, {})[key] = measure.value
    for step in sorted(by_step):
        tracker.log_metrics(target, by_step[step], step)
    return sorted(by_step.items())


def _close_killed(tracker, old: str, new: str) -> None:
    if not tracker.has_run(old):  # another store, or deleted: nothing to close
        return
    tracker.set_tags(old, {"continued_by_run": new})
    if tracker.client.get_run(old).info.status == "RUNNING":  # killed without a chance to say so
        tracker.end(old, "KILLED")


@contextlib.contextmanager
def resumable_run(
    tracker,
    storage: Path,
    kind: str,
    key: str,
    name: str,
    tags: dict[str, str],
    params: dict,
    parent_id: str | None = None,
) -> Iterator[tuple[str, DiskReporter, list]]:
    """A new MLflow run for the plain run `kind`-`key`, continuing the checkpoint a killed run of the same key
    left: yields (run id, the reporter the run's context checkpoints through, the history copied so far)."""
    from orchestrator.cache import ExclusiveLock  # imports torch, which validation does not

    folder = storage / "partial" / f"{kind}-{key}"
    folder.parent.mkdir(parents=True, exist_ok=True)

    def waiting(message: str) -> None:
        print(
            f"{name}: {message.replace('finish building', 'finish')} (the same run, already training)",
            file=sys.stderr,
            flush=True,
        )

    with ExclusiveLock(folder.parent / f"{folder.name}.lock", on_wait=waiting):
        folder.mkdir(exist_ok=True)
        reporter = DiskReporter(folder)
        try:
            previous = json.loads((folder / RUN_FILE).read_text())["run_id"]
        except (OSError, ValueError, KeyError):
            previous = None
        run_id = tracker.start_run(name, tags, parent_id)
        tracker.log_params(run_id, params)
        history: list[tuple[int, dict[str, float]]] = []
        if previous is not None:
            step = reporter.step() if reporter.get_state() is not None else 0
            if step and tracker.has_run(previous):
                history = copy_history(tracker, previous, run_id, step)
            tracker.set_tags(run_id, {"resumed_from_run": previous, "resumed_at_step": str(step)})
            _close_killed(tracker, previous, run_id)
            print(f"{name}: run {previous} was cut off; continuing it from step {step} as run {run_id}", flush=True)
        atomic_write_bytes(folder / RUN_FILE, json.dumps({"run_id": run_id}).encode())
        try:
            yield run_id, reporter, history
        except KeyboardInterrupt:  # interrupted (every stop signal under bdo): the same command resumes
            raise
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        shutil.rmtree(folder, ignore_errors=True)
