"""The attack is built once: backdoored models and poisoned datasets stored by content hash.

Key = hash of (attack name, resolved attack config incl. dataset, model and seeds, data options). Creation is
guarded by an exclusive-create marker file next to the entry, which works across processes and across nodes on
a shared filesystem; entries are written into a temporary folder and renamed into place, and carry a SHA-256
checksum that is verified on every load (a corrupt entry is rebuilt, never used).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from methods.attacks.base import Backdoor

FORMAT_VERSION = 1
CHECKSUM_FILE = "SHA256SUMS"
META_FILE = "entry.json"


def cache_key(attack: str, attack_config: dict, data_config: dict, built_with: dict) -> str:
    """`built_with`: the device type and resolved fast-path switches the model is trained under."""
    payload = json.dumps(
        {"v": FORMAT_VERSION, "attack": attack, "config": attack_config, "data": data_config, "built_with": built_with},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(directory: Path) -> None:
    lines = [f"{_sha256(p)}  {p.name}" for p in sorted(directory.iterdir()) if p.is_file() and p.name != CHECKSUM_FILE]
    (directory / CHECKSUM_FILE).write_text("\n".join(lines) + "\n")


def checksum_problem(directory: Path) -> str | None:
    """Which file of an entry fails its checksum, and how, in words; None when every file matches."""
    sums = directory / CHECKSUM_FILE
    if not sums.is_file():
        return f"{CHECKSUM_FILE} is missing"
    try:
        for line in sums.read_text().splitlines():
            digest, name = line.split("  ", 1)
            if not (directory / name).is_file():
                return f"{name} is missing"
            if _sha256(directory / name) != digest:
                return f"{name} does not match its checksum (truncated or changed)"
    except (OSError, ValueError) as exc:
        return f"{CHECKSUM_FILE} is unreadable ({exc})"
    return None


def verify_checksums(directory: Path) -> bool:
    return checksum_problem(directory) is None


class ExclusiveLock:
    """A lock file created with O_CREAT|O_EXCL (atomic on local disks and NFSv3+), naming its holder (host, pid).

    A holder on this host is stale only when its process is gone: a live builder keeps the lock however long a
    CIFAR-scale attack trains. A holder on another host cannot be asked, so it refreshes the file's mtime from a
    heartbeat thread every `stale_after / 4` seconds while it holds the lock, and it counts as dead once the
    heartbeat is older than `stale_after`: a crashed builder never blocks the cache for long, a live one never
    loses its lock. A waiter says once whom it is waiting for."""

    def __init__(
        self, path: Path, stale_after: float = 600.0, poll: float = 0.5, on_wait: Callable[[str], None] | None = None
    ) -> None:
        self.path, self.stale_after, self.poll = path, stale_after, poll
        self.on_wait = on_wait or (lambda message: print(message, file=sys.stderr, flush=True))
        self._beating: threading.Event | None = None

    def acquire(self, timeout: float = 24 * 3600.0) -> None:
        deadline = time.monotonic() + timeout
        told = False
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                with os.fdopen(fd, "w") as f:
                    json.dump({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}, f)
                self._start_heartbeat()
                return
            except FileExistsError:
                if self._stale():
                    self.path.unlink(missing_ok=True)
                    continue
                if not told:
                    self.on_wait(f"waiting for {self.holder()} to finish building {self.path.stem}")
                    told = True
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"cache lock {self.path} held by {self.holder()} for too long; delete it if no build is running"
                    ) from None
                time.sleep(self.poll)

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return "another process"
        since = time.strftime("%H:%M:%S", time.localtime(info.get("time", 0)))
        return f"pid {info.get('pid', '?')} on {info.get('host', '?')} (since {since})"

    def _stale(self) -> bool:
        try:
            info = json.loads(self.path.read_text() or "{}")
            age = time.time() - self.path.stat().st_mtime
        except (OSError, ValueError):
            return False
        if info.get("host") == socket.gethostname() and info.get("pid"):
            try:
                os.kill(int(info["pid"]), 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass  # alive, owned by another user
            return False
        return age > self.stale_after

    def heartbeat(self) -> None:
        try:
            os.utime(self.path)
        except OSError:
            pass

    def _start_heartbeat(self) -> None:
        stop = threading.Event()
        self._beating = stop

        def beat() -> None:
            while not stop.wait(self.stale_after / 4):
                self.heartbeat()

        threading.Thread(target=beat, name=f"heartbeat-{self.path.name}", daemon=True).start()

    def release(self) -> None:
        if self._beating is not None:
            self._beating.set()
            self._beating = None
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> ExclusiveLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class AttackCache:
    def __init__(self, storage: Path, lock_stale_after: float = 600.0) -> None:
        self.lock_stale_after = lock_stale_after  # how long a silent holder on another host is trusted
        self.root = Path(storage).expanduser().resolve() / "attacks"
        self.root.mkdir(parents=True, exist_ok=True)
        self.builds = 0  # how many entries this process built (tests and benchmarks read it)

    def entry(self, key: str) -> Path:
        return self.root / key

    def meta(self, key: str) -> dict:
        path = self.entry(key) / META_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def load(self, key: str) -> Backdoor | None:
        """The entry if it exists and its checksums hold; a corrupt entry is moved aside and None returned."""
        directory = self.entry(key)
        if not directory.is_dir():
            return None
        problem = checksum_problem(directory)
        if problem is None:
            try:
                return Backdoor.load(directory)
            except Exception as exc:  # unreadable despite matching sums (format change): rebuild
                problem = f"it does not load ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        aside = self.root / f"{key}.corrupt-{uuid.uuid4().hex[:8]}"
        shutil.move(str(directory), str(aside))
        # not an error: the run goes on with a rebuilt entry, but a silent rebuild of a long attack hides a disk,
        # copy or sync problem; the entry is kept aside for a look, never deleted
        print(
            f"attack cache: entry {directory} is corrupt: {problem}; moved it to {aside} and rebuilding the attack",
            file=sys.stderr,
            flush=True,
        )
        return None

    def get_or_build(self, key: str, build: Callable[[], tuple[Backdoor, dict]]) -> tuple[Backdoor, dict, bool]:
        """Return (backdoor, entry meta, built_now). `build` returns the backdoor and meta (e.g. the attack's
        MLflow run id) and runs at most once per key across every process sharing this storage."""
        found = self.load(key)
        if found is not None:
            return found, self.meta(key), False
        lock = ExclusiveLock(self.root / f"{key}.lock", stale_after=self.lock_stale_after, poll=0.1)
        with lock:
            found = self.load(key)
            if found is not None:
                return found, self.meta(key), False
            backdoor, meta = build()
            tmp = self.root / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
            backdoor.save(tmp)
            (tmp / META_FILE).write_text(json.dumps({**meta, "key": key, "created": time.time()}, sort_keys=True))
            write_checksums(tmp)
            if self.entry(key).is_dir():  # a builder on another host whose heartbeat lapsed finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return self.load(key) or backdoor, self.meta(key), False
            os.replace(tmp, self.entry(key))
            self.builds += 1
            return backdoor, self.meta(key), True
