"""Stopping bdo. SIGINT (Ctrl-C), SIGTERM (`ray job stop`, kill, a container's stop) and SIGHUP (a closed terminal)
all raise one exception, Interrupted, in the main thread: every run the command has open then ends KILLED (never
FINISHED or FAILED: Tracker.ending), a sweep stops so that `--resume` continues it, and the exit code names the
signal (128 + its number: 130, 143, 129)."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A stop signal. A KeyboardInterrupt, so code that treats Ctrl-C as a stop treats the three alike; `partial`
    is what the interrupted work had done when it is worth showing (a sweep's SweepResult, its cut trials marked)."""

    def __init__(self, signum: int, partial: Any = None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.partial = signum, partial

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __reduce__(self):  # rebuilt from its number when a study's worker process sends it back
        return Interrupted, (self.signum,)


def _raise(signum: int, _frame) -> None:
    raise Interrupted(signum)


def catch_stop_signals() -> None:
    """From now on a stop signal raises Interrupted in the main thread (set by `bdo`'s entry point)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # signal.signal works there only


@contextlib.contextmanager
def kept_handlers() -> Iterator[None]:
    """Puts the stop signals' handlers back after the block. ray.init makes SIGTERM exit the process (after
    killing a local Ray's processes), which ended a sweep FAILED and left its trials RUNNING."""
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        if _main_thread():
            for sig, handler in previous.items():
                if handler is not None:  # None: set outside Python, nothing to put back
                    signal.signal(sig, handler)


@contextlib.contextmanager
def local_ray_in_its_own_session() -> Iterator[None]:
    """A local Ray started inside the block runs its processes in a session of their own, as Ray already does on
    Windows. Otherwise they share bdo's process group: a closed terminal (SIGHUP to the group) or a group-wide
    SIGTERM (systemd, a batch scheduler) ended Ray's GCS and raylet at once (they block SIGINT only), and the sweep
    could not wind down its trials. They still die with bdo: Ray ties each to its parent (PR_SET_PDEATHSIG), which a
    new session does not undo; without that kernel support they stay in bdo's group so that Ray's reaper finds them."""
    import ray._private.services as services
    import ray._private.utils as ray_utils

    if (
        not hasattr(services, "ConsolePopen")
        or not ray_utils.detect_fate_sharing_support()
        or not sys.platform.startswith("linux")
    ):
        yield
        return
    shared = services.ConsolePopen

    class OwnSessionPopen(shared):
        def __init__(self, *args, **kwargs):
            kwargs["start_new_session"] = True
            super().__init__(*args, **kwargs)

    services.ConsolePopen = OwnSessionPopen
    try:
        yield
    finally:
        services.ConsolePopen = shared


@contextlib.contextmanager
def winding_down(stop: Callable[[int, Any], None]) -> Iterator[list[int]]:
    """While the block runs, the first stop signal calls `stop(signum, frame)`, which asks the block to end early
    on its own (Tune then saves its state, so a resume keeps every finished trial), instead of raising; the block
    ends normally and the caller, who finds the signal in the list yielded, raises Interrupted once it has recorded
    what was done. A second signal raises at once."""
    caught: list[int] = []
    if not _main_thread():
        yield caught
        return

    def first(signum: int, frame) -> None:
        caught.append(signum)
        stop(signum, frame)
        for sig in STOP_SIGNALS:  # after stop, which may install handlers of its own
            signal.signal(sig, _raise)

    with kept_handlers():
        for sig in STOP_SIGNALS:
            signal.signal(sig, first)
        yield caught
