"""The attack cache's lock holds for as long as a live builder needs it, and only one build ever happens."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from orchestrator.cache import ExclusiveLock

ROOT = Path(__file__).resolve().parents[2]

# A process that builds one cache entry with a build that lasts far longer than the lock's stale age.
BUILDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import orchestrator.cache as cache
    from methods.core.context import LocalContext
    from methods.core.method import get_method
    from methods.data.base import DataConfig

    storage, log, seconds = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])

    def build():
        with open(log, "a") as f:
            f.write("build\\n")
        time.sleep(seconds)
        spec = get_method("badnets")
        cfg = spec.make_config(dict(epochs=1, batch_size=64))
        return spec.run(LocalContext(data_config=DataConfig(train_limit=64, test_limit=64)), cfg), {"by": sys.argv[4]}

    backdoor, meta, built = cache.AttackCache(storage, lock_stale_after=0.5).get_or_build("k" * 20, build)
    print("built" if built else "loaded", meta["by"])
""")


def test_a_live_builder_keeps_the_lock_past_the_stale_age_and_builds_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = tmp_path / "builds.log"
    first = subprocess.Popen(
        [sys.executable, "-c", BUILDER, str(tmp_path), str(log), "4", "first"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not log.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.Popen(
        [sys.executable, "-c", BUILDER, str(tmp_path), str(log), "0", "second"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out1, err1 = first.communicate(timeout=120)
    out2, err2 = second.communicate(timeout=120)
    assert first.returncode == 0 and second.returncode == 0, err1 + err2
    assert log.read_text().splitlines() == ["build"], "the second process must wait, not build again"
    assert out1.strip() == "built first" and out2.strip() == "loaded first"
    assert "waiting for pid" in err2 and f"on {socket.gethostname()}" in err2, err2


def _claim(path: Path, host: str, pid: int) -> None:
    path.write_text(json.dumps({"host": host, "pid": pid, "time": time.time()}))


def test_a_holder_on_another_host_is_stale_only_once_its_heartbeat_stops(tmp_path):
    lock_path = tmp_path / "entry.lock"
    _claim(lock_path, "another-node", 1)
    lock = ExclusiveLock(lock_path, stale_after=30.0)
    assert not lock._stale(), "a fresh heartbeat means a live holder"
    old = time.time() - 60
    os.utime(lock_path, (old, old))
    assert lock._stale(), "no heartbeat for longer than stale_after: the holder died"


def test_a_dead_holder_on_this_host_is_stale_at_once_and_a_live_one_never(tmp_path):
    lock_path = tmp_path / "entry.lock"
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _claim(lock_path, socket.gethostname(), int(done.stdout))  # that process has exited
    assert ExclusiveLock(lock_path, stale_after=3600.0)._stale()
    _claim(lock_path, socket.gethostname(), os.getpid())
    old = time.time() - 7200
    os.utime(lock_path, (old, old))
    assert not ExclusiveLock(lock_path, stale_after=1.0)._stale()


def test_the_holder_refreshes_its_heartbeat_while_holding(tmp_path):
    lock = ExclusiveLock(tmp_path / "entry.lock", stale_after=0.2)
    with lock:
        old = time.time() - 60
        os.utime(lock.path, (old, old))
        time.sleep(0.3)
        assert time.time() - lock.path.stat().st_mtime < 1.0
    assert not lock.path.exists()
