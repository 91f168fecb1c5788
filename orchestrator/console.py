"""What a run or a sweep prints while it trains: one progress line per report of a single run, and a line per
finished trial plus a periodic summary of a sweep."""

from __future__ import annotations

import math
import os
import sys
import time

PROGRESS_INTERVAL = 60.0


def progress_interval() -> float:
    """BDO_PROGRESS_INTERVAL (seconds, > 0), else PROGRESS_INTERVAL."""
    try:
        value = float(os.environ.get("BDO_PROGRESS_INTERVAL", ""))
    except ValueError:
        return PROGRESS_INTERVAL
    return value if value > 0 and math.isfinite(value) else PROGRESS_INTERVAL


def improves(value, best: float | None, mode: str) -> bool:
    """Whether a reported objective value is a number that beats the best so far (None: nothing yet)."""
    if not isinstance(value, (int, float)) or math.isnan(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


class SweepProgress:
    """One line per finished trial (and, on a terminal, a status line rewritten in place while trials run): the
    trial, its state, its last validation metrics and the best objective so far. And, when nothing was printed for
    progress_interval() seconds, a summary line: trials running, pending, finished and errored, the best objective
    reported so far, and the time since the sweep started; checked on every step of Tune's loop, which steps
    several times a second whether or not a trial reports."""

    def __new__(cls, *args, **kwargs):
        from ray.tune import Callback

        class Progress(Callback):
            def __init__(
                self,
                label: str,
                metric: str,
                mode: str,
                total: int,
                interval: float | None = None,
                clock=time.monotonic,
            ) -> None:
                self.label, self.metric, self.mode, self.total = label, metric, mode, total
                self.done, self.best, self.tty = 0, None, sys.stdout.isatty()
                self.interval = progress_interval() if interval is None else interval
                self.clock = clock
                self.started = self.printed = clock()

            def _better(self, value) -> bool:
                return improves(value, self.best, self.mode)

            def summary(self, trials) -> str:
                counts = {"RUNNING": 0, "PENDING": 0, "PAUSED": 0, "TERMINATED": 0, "ERROR": 0}
                best = self.best
                for trial in trials:
                    counts[trial.status] = counts.get(trial.status, 0) + 1
                    value = (trial.last_result or {}).get(self.metric)
                    if trial.status != "ERROR" and improves(value, best, self.mode):
                        best = value
                shown = f"{best:.3f}" if best is not None else "-"
                elapsed = int(self.clock() - self.started)
                return (
                    f"{self.label}: progress  running {counts['RUNNING']}  pending "
                    f"{counts['PENDING'] + counts['PAUSED']}  finished {counts['TERMINATED']}/{self.total}  "
                    f"errored {counts['ERROR']}  best {self.metric} {shown}  "
                    f"elapsed {elapsed // 3600}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}"
                )

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
                print(
                    f"{prefix}{self.label}: trial {self.done}/{self.total} {trial.trial_id} {state}  "
                    f"{self._shown(result)}{best}",
                    flush=True,
                )
                self.printed = self.clock()

            def on_trial_complete(self, iteration, trials, trial, **info):
                self._finish(trial, "done")

            def on_trial_error(self, iteration, trials, trial, **info):
                self._finish(trial, "FAILED")

        return Progress(*args, **kwargs)


class ProgressPrinter:
    """A one-line-per-step progress display for single runs."""

    def __init__(self, label: str, fault=None) -> None:
        # the run's engine says how many steps there are before the first (expect_steps)
        self.label, self.total, self.started = label, None, time.perf_counter()
        self.steps = 0
        self.fault = fault  # BDO_FAULT's hook (execute.fault_hook), for the interruption tests of plain runs

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        self.steps += 1
        if self.fault is not None:
            self.fault(step, metrics)
        shown = "  ".join(
            f"{k}={metrics[k]:.3f}" for k in ("val_acc", "val_asr", "test_acc", "test_asr") if k in metrics
        )
        total = f"/{self.total}" if self.total else ""
        bar = ""
        if self.total:
            filled = int(20 * min(step, self.total) / self.total)
            bar = "[" + "#" * filled + "." * (20 - filled) + "] "
            if step > self.total:  # the model a defense returns, reported after its last step (final_result)
                total = " (the returned model)"
        print(f"{self.label} {bar}step {step}{total}  {shown}  ({time.perf_counter() - self.started:.0f}s)", flush=True)

    def expect_steps(self, total: int) -> None:
        """The run's own count of steps (RunContext.expect_steps): a defense with several stages (ARGD's teacher
        and student, SD before D-BR's rounds) reports more steps than its config's `epochs`."""
        self.total = total
