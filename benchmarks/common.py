"""What every benchmark shares: result rows, sizes, timing, peak-memory probes and the environment.

Nothing here imports ray or mlflow; torch is imported only inside the functions that need it, so the suite's
driver and its pure-torch benchmarks run on a machine with torch and torchvision alone.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# Set before ray is imported anywhere in the process (the tests and the orchestrator do the same).
BENCH_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_TRAIN_V2_ENABLED": "1",
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
    # a loaded machine can take far longer than Ray's default 10 s to register the raylet
    "RAY_raylet_start_wait_time_s": "120",
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
    "PYTHONUNBUFFERED": "1",
}


def apply_env() -> None:
    for key, value in BENCH_ENV.items():
        os.environ.setdefault(key, value)


# --------------------------------------------------------------------------------------------------- results
@dataclass
class Goal:
    """`target op value`, where target is the row's "ratio" or its "measured" figure, op "<=" or ">="."""

    target: str
    op: str
    value: float

    def met(self, row: Row) -> bool | None:
        figure = row.ratio if self.target == "ratio" else row.measured
        if figure is None or not math.isfinite(figure):
            return None
        return figure <= self.value if self.op == "<=" else figure >= self.value

    def text(self, unit: str = "") -> str:
        if self.target == "ratio":
            return f"{self.op} {self.value:g}"
        return f"{self.op} {format_number(self.value)} {unit}".rstrip()


@dataclass
class Row:
    """One line of the table. `ratio` is always measured / baseline; `goal` says which direction is good."""

    name: str
    measured: float = math.nan
    baseline: float = math.nan
    unit: str = ""
    baseline_unit: str = ""
    what: str = ""  # one line: what is measured against what
    goal: Goal | None = None
    peak_host_mb: float = math.nan
    peak_gpu_mb: float = math.nan
    status: str = "ok"  # ok | skipped | error
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        if not (math.isfinite(self.measured) and math.isfinite(self.baseline)) or self.baseline == 0:
            return math.nan
        return self.measured / self.baseline

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ratio"] = self.ratio
        out["goal"] = None if self.goal is None else {**asdict(self.goal), "text": self.goal.text(self.unit)}
        out["goal_met"] = None if self.goal is None else self.goal.met(self)
        return out

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Row:
        values = {k: v for k, v in data.items() if k not in ("ratio", "goal_met", "goal")}
        goal = data.get("goal")
        values["goal"] = None if goal is None else Goal(goal["target"], goal["op"], float(goal["value"]))
        for key in ("measured", "baseline", "peak_host_mb", "peak_gpu_mb"):
            values[key] = math.nan if values.get(key) is None else float(values[key])
        return Row(**values)


def last_line(error: object) -> str:
    """The last non-empty line of an exception's text (Ray wraps the cause in a traceback), without colours."""
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line]
    return lines[-1][:300] if lines else type(error).__name__


def skipped(name: str, why: str, what: str = "") -> Row:
    return Row(name=name, status="skipped", note=why, what=what)


def format_number(value: float) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


# ----------------------------------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one suite run (see `sizes_for`)."""

    train_images: int  # training images of the throughput rows (after the validation split)
    test_images: int
    warmup_epochs: int
    measured_epochs: int
    loader_epochs: int  # measured epochs of each DataLoader baseline (after one warm-up epoch)
    adv_images: int  # images per PGD / FCT repetition
    adv_reps: int
    pgd_steps: int
    share_images: int  # training images of each process of the sharing row
    share_epochs: int
    orch_images: int  # training images of the orchestrator rows
    orch_epochs: int  # epochs of the orchestrator-overhead trial (first one is start-up)
    # the short-epoch variant: an epoch as short as a GPU's, so that the fixed per-epoch costs show
    short_epoch_images: int
    short_epoch_epochs: int
    sweep_trials: int
    sweep_concurrency: int
    sweep_attack_epochs: int
    sweep_defense_epochs: int
    trivial_trials: int
    trivial_seconds: float


def sizes_for(quick: bool, device: str) -> Sizes:
    if quick:
        return Sizes(
            train_images=512,
            test_images=100,
            warmup_epochs=1,
            measured_epochs=1,
            loader_epochs=1,
            adv_images=128,
            adv_reps=2,
            pgd_steps=10,
            share_images=256,
            share_epochs=1,
            orch_images=512,
            orch_epochs=3,
            short_epoch_images=256,
            short_epoch_epochs=3,
            sweep_trials=2,
            sweep_concurrency=2,
            sweep_attack_epochs=1,
            sweep_defense_epochs=1,
            trivial_trials=4,
            trivial_seconds=0.2,
        )
    if device == "cuda":
        return Sizes(
            train_images=50_000,
            test_images=2_000,
            warmup_epochs=1,
            measured_epochs=3,
            loader_epochs=2,
            adv_images=8_192,
            adv_reps=5,
            pgd_steps=10,
            share_images=50_000,
            share_epochs=3,
            orch_images=50_000,
            orch_epochs=5,
            short_epoch_images=10_000,
            short_epoch_epochs=8,
            sweep_trials=8,
            sweep_concurrency=4,
            sweep_attack_epochs=5,
            sweep_defense_epochs=5,
            trivial_trials=40,
            trivial_seconds=1.0,
        )
    return Sizes(
        train_images=10_000,
        test_images=500,
        warmup_epochs=1,
        measured_epochs=3,
        loader_epochs=2,
        adv_images=1_024,
        adv_reps=3,
        pgd_steps=10,
        share_images=2_000,
        share_epochs=2,
        orch_images=10_000,
        orch_epochs=4,
        short_epoch_images=2_000,
        short_epoch_epochs=8,
        sweep_trials=8,
        sweep_concurrency=2,
        sweep_attack_epochs=2,
        sweep_defense_epochs=3,
        trivial_trials=20,
        trivial_seconds=1.0,
    )


def synthetic_train_for(train_images: int, val_fraction: float = 0.05) -> int:
    """`synthetic_train` such that exactly `train_images` remain after load_splits holds out the validation
    fraction (load_splits keeps n - round(fraction * n))."""
    n = max(100, int(round(train_images / (1.0 - val_fraction))))
    while n - int(round(val_fraction * n)) < train_images:
        n += 1
    while n > 100 and (n - 1) - int(round(val_fraction * (n - 1))) >= train_images:
        n -= 1
    return n


# ---------------------------------------------------------------------------------------------------- timing
def synchronize(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def repeat_rate(fn: Callable[[], Any], items: int, warmup: int, reps: int, device: Any) -> tuple[float, list[float]]:
    """Items per second of fn(): `warmup` untimed calls, then the median of `reps` timed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    rates = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        synchronize(device)
        rates.append(items / (time.perf_counter() - started))
    return median(rates), rates


def load_average() -> tuple[float, float, float]:
    try:
        parts = Path("/proc/loadavg").read_text().split()
        return float(parts[0]), float(parts[1]), float(parts[2])
    except (OSError, ValueError, IndexError):
        return (math.nan, math.nan, math.nan)


# ---------------------------------------------------------------------------------------------- peak memory
def status_kb(pid: int | str, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _pss_kb(pid: int) -> int | None:
    """Proportional set size (shared pages split between their users), else RSS."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return status_kb(pid, "VmRSS")


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def tree_pss_kb(root: int) -> int:
    return sum(_pss_kb(pid) or 0 for pid in [root, *descendants(root)])


class MemoryProbe:
    """Peak host memory of this process (VmHWM, reset through /proc/self/clear_refs) and, while `tree` is on,
    the peak of the summed PSS of this process and all its descendants (DataLoader workers, Ray's daemons and
    workers, child benchmark processes), sampled every `interval` seconds. Peak GPU memory is
    torch.cuda.max_memory_allocated after reset_peak_memory_stats (this process's tensors).

    Every 2 s, not faster: reading a process's PSS (smaps_rollup) walks its page tables under its memory-map lock,
    which stalls the process being measured. Sampling the tree every 0.25 s made a bdo tune epoch 21-24% slower
    than a plain one (orchestrator.epoch 1.21 / 1.24 in two runs; 1.02 / 1.03 at 2 s, peaks within 1%), so most of
    the orchestration tax that row reported was the probe's own."""

    def __init__(self, device: str = "cpu", interval: float = 2.0) -> None:
        self.device, self.interval = device, interval
        self._tree_peak_kb = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.hwm_reset_ok = True

    def reset(self) -> None:
        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.hwm_reset_ok = False
        self._tree_peak_kb = 0
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def _sample(self) -> None:
        root = os.getpid()
        while not self._stop.wait(self.interval):
            self._tree_peak_kb = max(self._tree_peak_kb, tree_pss_kb(root))

    @contextlib.contextmanager
    def tree(self) -> Iterator[None]:
        """Sample the process tree while the block runs."""
        self._stop.clear()
        self._tree_peak_kb = max(self._tree_peak_kb, tree_pss_kb(os.getpid()))
        self._thread = threading.Thread(target=self._sample, name="bench-memory", daemon=True)
        self._thread.start()
        try:
            yield
        finally:
            self._stop.set()
            self._thread.join()
            self._tree_peak_kb = max(self._tree_peak_kb, tree_pss_kb(os.getpid()))

    def host_mb(self) -> float:
        own = status_kb("self", "VmHWM") or 0
        return max(own, self._tree_peak_kb) / 1024.0

    def gpu_mb(self) -> float:
        if self.device != "cuda":
            return math.nan
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20

    def fill(self, row: Row) -> Row:
        row.peak_host_mb = self.host_mb()
        row.peak_gpu_mb = self.gpu_mb()
        return row


# --------------------------------------------------------------------------------------------- bench context
@dataclass
class BenchContext:
    """What a benchmark function receives: the device, the sizes and switches of this run, a memory probe, a
    scratch directory, and `shared` (state a process group sets up once, e.g. a Ray instance)."""

    device: str
    quick: bool
    sizes: Sizes
    probe: MemoryProbe
    scratch: Path
    compile: str = ""  # a torch.compile mode for the fast-path rows; empty: no compile
    verbose: bool = False
    shared: dict[str, Any] = field(default_factory=dict)

    def log(self, message: str) -> None:
        if self.verbose:
            print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)

    def torch_device(self):
        import torch

        return torch.device(self.device)


def module_available(name: str) -> bool:
    """Whether `name` can be imported, honouring BDO_BENCH_HIDE (a comma list the suite treats as missing)."""
    import importlib.util

    hidden = {m.strip() for m in os.environ.get("BDO_BENCH_HIDE", "").split(",") if m.strip()}
    if name in hidden:
        return False
    return importlib.util.find_spec(name) is not None


def hide_modules() -> None:
    """Make the modules named in BDO_BENCH_HIDE unimportable in this process, as on a machine without them
    (the test of the torch-only promise uses it; a stray top-level `import ray` then fails loudly)."""
    import sys

    hidden = {m.strip() for m in os.environ.get("BDO_BENCH_HIDE", "").split(",") if m.strip()}
    if not hidden:
        return

    class _Blocker:
        def find_spec(self, fullname, path=None, target=None):
            if fullname.split(".")[0] in hidden:
                raise ModuleNotFoundError(f"No module named {fullname!r} (hidden by BDO_BENCH_HIDE)", name=fullname)
            return None

    sys.meta_path.insert(0, _Blocker())
