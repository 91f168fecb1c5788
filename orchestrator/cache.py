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
import time
import uuid
from pathlib import Path
from typing import Callable

from methods.attacks.base import Backdoor

FORMAT_VERSION = 1
CHECKSUM_FILE = "SHA256SUMS"
META_FILE = "entry.json"


def cache_key(attack: str, attack_config: dict, data_config: dict, built_with: dict) -> str:
    """`built_with`: the device type and resolved fast-path switches the model is trained under."""
    payload = json.dumps({"v": FORMAT_VERSION, "attack": attack, "config": attack_config, "data": data_config,
                          "built_with": built_with}, sort_keys=True, default=str)
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


def verify_checksums(directory: Path) -> bool:
    sums = directory / CHECKSUM_FILE
    if not sums.is_file():
        return False
    try:
        for line in sums.read_text().splitlines():
            digest, name = line.split("  ", 1)
            if not (directory / name).is_file() or _sha256(directory / name) != digest:
                return False
    except (OSError, ValueError):
        return False
    return True


class ExclusiveLock:
    """A lock file created with O_CREAT|O_EXCL (atomic on local disks and NFSv3+). A holder that died is
    detected by its heartbeat going stale, so a crashed builder never blocks the cache forever."""

    def __init__(self, path: Path, stale_after: float = 600.0, poll: float = 0.5) -> None:
        self.path, self.stale_after, self.poll = path, stale_after, poll

    def acquire(self, timeout: float = 24 * 3600.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                with os.fdopen(fd, "w") as f:
                    json.dump({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}, f)
                return
            except FileExistsError:
                if self._stale():
                    self.path.unlink(missing_ok=True)
                    continue
                if time.monotonic() > deadline:
                    raise TimeoutError(f"cache lock {self.path} held too long; delete it if no build is running")
                time.sleep(self.poll)

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
                pass
        return age > self.stale_after

    def heartbeat(self) -> None:
        try:
            os.utime(self.path)
        except OSError:
            pass

    def release(self) -> None:
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> "ExclusiveLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class AttackCache:
    def __init__(self, storage: Path) -> None:
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
        if not verify_checksums(directory):
            shutil.move(str(directory), str(self.root / f"{key}.corrupt-{uuid.uuid4().hex[:8]}"))
            return None
        try:
            return Backdoor.load(directory)
        except Exception:  # unreadable despite matching sums (format change): rebuild
            shutil.move(str(directory), str(self.root / f"{key}.corrupt-{uuid.uuid4().hex[:8]}"))
            return None

    def get_or_build(self, key: str, build: Callable[[], tuple[Backdoor, dict]]) -> tuple[Backdoor, dict, bool]:
        """Return (backdoor, entry meta, built_now). `build` returns the backdoor and meta (e.g. the attack's
        MLflow run id) and runs at most once per key across every process sharing this storage."""
        found = self.load(key)
        if found is not None:
            return found, self.meta(key), False
        lock = ExclusiveLock(self.root / f"{key}.lock")
        with lock:
            found = self.load(key)
            if found is not None:
                return found, self.meta(key), False
            backdoor, meta = build()
            lock.heartbeat()
            tmp = self.root / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
            backdoor.save(tmp)
            (tmp / META_FILE).write_text(json.dumps({**meta, "key": key, "created": time.time()}, sort_keys=True))
            write_checksums(tmp)
            os.replace(tmp, self.entry(key))
            self.builds += 1
            return backdoor, self.meta(key), True
