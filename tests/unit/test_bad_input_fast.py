"""Bad input that depends on the machine, the environment or files on disk: one line naming what is wrong and how
to fix it, exit 2, before any store, cache or run is created, and nothing already there is changed. In process
(orchestrator.cli.main) with temporary folders; only the fresh-store race spawns processes."""

from __future__ import annotations

import errno
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[2]
SPACES = ROOT / "search_spaces"
STUDY = ROOT / "examples" / "study-digits.yaml"


def refused(argv: list[str], capsys, message: str, limit: float = 5.0) -> str:
    started = time.perf_counter()
    assert main(argv) == 2, argv
    took = time.perf_counter() - started
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err, err
    assert took < limit, f"{argv} took {took:.1f}s to refuse"  # the rule is 2 s; a loaded 2-core runner gets slack
    return err


def refused_in_a_fresh_process(argv: list[str], cwd: Path, message: str) -> str:
    """Like refused, in a new process: checks made before Ray starts are skipped where a caller's Ray is already
    up, as it is in this test process once the suite's session Ray has started, and MLflow caches its stores.
    The process gets none of the store or cluster the suite left in the environment (mlflow.set_tracking_uri
    exports MLFLOW_TRACKING_URI), so it reads the store in cwd as a user's shell would."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("MLFLOW_") and key not in ("RAY_ADDRESS", "BDO_FAULT")
    }
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "PYTHONPATH": str(ROOT)},
    )
    err = done.stderr.strip()
    assert done.returncode == 2 and len(err.splitlines()) == 1 and message in err, (argv, done.returncode, err)
    return err


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# ------------------------------------------------------------------------------------------------ BDO_DEVICE
def _unseen_gpu() -> tuple[str, str]:
    """A BDO_DEVICE naming a GPU this process cannot see, and what the refusal says."""
    from methods.core.hardware import visible_gpu_count

    count = visible_gpu_count()
    return ("cuda", "no CUDA device is visible") if count == 0 else (f"cuda:{count}", f"sees {count} GPU(s)")


@pytest.mark.parametrize(
    "argv",
    [
        ["attack", "badnets", "--set", "epochs=1"],
        ["attack", "badnets", "--dry-run"],
        ["defend", "ft", "--set", "epochs=1"],
        ["tune", str(SPACES / "ft.yaml"), "--quick"],
    ],
)
@pytest.mark.parametrize("device", ["unseen gpu", "tpu9", "cuda:x"])
def test_a_device_bdo_cannot_use_is_refused_before_the_store(argv, device, tmp_path, monkeypatch, capsys):
    value, message = _unseen_gpu() if device == "unseen gpu" else (device, "not a device; use cpu, cuda or cuda:N")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BDO_DEVICE", value)
    err = refused(argv, capsys, message)
    assert f"BDO_DEVICE={value!r}" in err
    assert listing(tmp_path) == []


def test_an_unseen_gpu_is_allowed_when_the_command_keeps_to_the_cpu(tmp_path, monkeypatch, capsys):
    """--gpus-per-trial 0 puts the attack and every trial on the CPU: BDO_DEVICE is never read."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BDO_DEVICE", _unseen_gpu()[0])
    assert main(["tune", str(SPACES / "ft.yaml"), "--quick", "--gpus-per-trial", "0", "--dry-run"]) == 0
    assert "attack_device: cpu" in capsys.readouterr().out
    monkeypatch.setenv("BDO_DEVICE", "tpu9")  # a malformed value is refused all the same
    refused(["tune", str(SPACES / "ft.yaml"), "--quick", "--gpus-per-trial", "0"], capsys, "BDO_DEVICE='tpu9'")


# ------------------------------------------------------------------------------------- binary YAML files
@pytest.mark.parametrize("command", ["tune", "study"])
def test_a_binary_space_or_study_file_is_named(command, tmp_path, monkeypatch, capsys):
    path = tmp_path / f"{command}.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    err = refused([command, str(path)], capsys, "not a text file")
    assert str(path) in err and "UTF-8" in err
    assert listing(work) == []


# ---------------------------------------------------------------------------------------- trigger images
def _images(folder: Path) -> dict[str, tuple[Path, str]]:
    from PIL import Image

    good = folder / "good.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(good)
    (folder / "text.png").write_text("not an image")
    blob = good.read_bytes()
    (folder / "truncated.png").write_bytes(blob[: len(blob) // 2])
    (folder / "a-folder.png").mkdir()
    return {
        "missing": (folder / "nope.png", "does not exist"),
        "not an image": (folder / "text.png", "is not a readable image"),
        "truncated": (folder / "truncated.png", "is not a readable image"),
        "a folder": (folder / "a-folder.png", "is not a file"),
    }


@pytest.mark.parametrize("how", ["missing", "not an image", "truncated", "a folder"])
@pytest.mark.parametrize(
    "command",
    [
        ["attack", "badnets", "--set", "pattern=file", "--set", "patch_file={}"],
        ["attack", "blend", "--set", "pattern=file", "--set", "pattern_file={}"],
        ["defend", "ft", "--set", "attack.pattern=file", "--set", "attack.patch_file={}"],
    ],
)
def test_a_bad_trigger_image_is_named_before_the_attack_run(how, command, tmp_path, monkeypatch, capsys):
    images = tmp_path / "images"
    images.mkdir()
    path, message = _images(images)[how]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    field = "pattern_file" if "blend" in command else "patch_file"
    err = refused([arg.format(path) for arg in command], capsys, message)
    assert f"{field}: {path}" in err
    assert listing(work) == []
    assert main([arg.format(images / "good.png") for arg in command] + ["--dry-run"]) == 0


def test_a_bad_trigger_image_in_a_search_space_is_named(tmp_path, monkeypatch, capsys):
    space = tmp_path / "space.yaml"
    space.write_text(f"method: badnets\nfixed: {{pattern: file, patch_file: {tmp_path / 'nope.png'}}}\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    refused(["tune", str(space)], capsys, f"patch_file: {tmp_path / 'nope.png'} does not exist")
    assert listing(work) == []


# --------------------------------------------------------------------------------- unwritable sqlite stores
def test_a_store_sqlite_cannot_write_is_refused_at_once(tmp_path, monkeypatch, capsys):
    """MLflow retried such a store for about 105 s. As root a read-only folder is writable, so /proc stands in
    for a place nothing may create a file (every user), and a read-only mount is simulated below."""
    monkeypatch.chdir(tmp_path)
    refused(["attack", "badnets", "--tracking-uri", "/proc/mlflow.db"], capsys, "cannot write /proc")
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro" / "mlflow.db").write_bytes(b"")
        (tmp_path / "ro").chmod(0o555)
        try:
            refused(["attack", "badnets", "--tracking-uri", "ro/mlflow.db"], capsys, "cannot write")
        finally:
            (tmp_path / "ro").chmod(0o755)
        (tmp_path / "ro" / "mlflow.db").unlink()
        (tmp_path / "ro").rmdir()
    assert listing(tmp_path) == []


@pytest.mark.parametrize("existing", [False, True])
def test_a_store_on_a_read_only_mount_is_refused_even_for_root(existing, tmp_path, monkeypatch, capsys):
    """A read-only mount refuses root too (EROFS); os.access alone would not see it for root on every system,
    so the check tries to create a file, and to open the store for writing. Simulated here by making both fail
    with EROFS."""
    import builtins
    import tempfile

    db = tmp_path / "mlflow.db"
    if existing:
        db.write_bytes(b"")  # an empty store: SQLite's empty database
    real_open = builtins.open

    def erofs(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    def open_read_only(file, mode="r", *args, **kwargs):
        if str(file) == str(db) and any(c in mode for c in "wa+"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(db))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", erofs)
    monkeypatch.chdir(tmp_path)
    err = refused(["attack", "badnets", "--tracking-uri", str(db)], capsys, "Read-only file system")
    assert f"cannot write {tmp_path}" in err
    monkeypatch.undo()
    if existing:  # the folder is writable but the file is not
        monkeypatch.setattr(builtins, "open", open_read_only)
        monkeypatch.chdir(tmp_path)
        err = refused(["attack", "badnets", "--tracking-uri", str(db)], capsys, "Read-only file system")
        assert f"cannot write {db}" in err
        monkeypatch.undo()
    assert listing(tmp_path) == (["mlflow.db"] if existing else [])


def test_reading_commands_do_not_need_a_writable_store(tmp_path, monkeypatch):
    import tempfile

    from orchestrator.cli import _check_tracking_uri

    db = tmp_path / "mlflow.db"
    sqlite3.connect(db).execute("CREATE TABLE t (x)").connection.commit()
    monkeypatch.setattr(
        tempfile,
        "NamedTemporaryFile",
        lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system")),
    )
    assert _check_tracking_uri(f"sqlite:///{db}", write=False) == f"sqlite:///{db}"


# ------------------------------------------------------------------------------------- resources per trial
def test_more_cpus_per_trial_than_this_machine_has_is_refused_before_ray(tmp_path, monkeypatch, capsys):
    # Far above this machine and above the suite's session Ray (4 CPUs declared on 2 cores).
    for argv, message in [
        (
            ["tune", str(SPACES / "ft.yaml"), "--quick", "--cpus-per-trial", "1000"],
            "--cpus-per-trial 1000: this machine (a local Ray's only node) has",
        ),
        (["tune", str(SPACES / "ft.yaml"), "--cpus-per-trial", "100", "--dry-run"], "--cpus-per-trial 100:"),
        (
            ["tune", str(SPACES / "ft.yaml"), "--cpus-per-trial", "2000", "--workers-per-trial", "2"],
            "over --workers-per-trial 2 (1000 per worker)",
        ),
        (["study", str(STUDY), "--cpus-per-trial", "100"], "--cpus-per-trial 100:"),
    ]:
        refused_in_a_fresh_process(argv, tmp_path, message)
    space = tmp_path / "space.yaml"
    space.write_text("method: ft\nresources: {cpus_per_trial: 1000}\n")
    work = tmp_path / "work"
    work.mkdir()
    refused_in_a_fresh_process(["tune", str(space)], work, f"{space}: resources.cpus_per_trial 1000: this machine")
    assert listing(work) == []


def test_more_gpus_per_trial_than_this_machine_has_is_refused(tmp_path, monkeypatch, capsys):
    from methods.core.hardware import visible_gpu_count

    want = visible_gpu_count() + 1 if visible_gpu_count() else 4
    monkeypatch.chdir(tmp_path)
    for argv in (
        ["tune", str(SPACES / "ft.yaml"), "--gpus-per-trial", str(want)],
        ["study", str(STUDY), "--gpus-per-trial", str(want)],
    ):
        refused(argv, capsys, f"--gpus-per-trial {want}:")
    assert listing(tmp_path) == []


@pytest.fixture
def fake_cluster(monkeypatch):
    """`--address`: Ray is not started; the cluster's nodes are what ClusterShape.from_ray reports."""
    from orchestrator.devices import ClusterShape
    from orchestrator.session import Session

    started = []
    monkeypatch.setattr(Session, "start_ray", lambda self, num_cpus=None: started.append(self.address))
    monkeypatch.setattr(Session, "stop_ray", lambda self: None)
    monkeypatch.setattr(ClusterShape, "from_ray", staticmethod(lambda: ClusterShape((0.0, 0.0), (4.0, 8.0))))

    def attack_built(*args, **kwargs):
        raise AssertionError("the attack was built before the resources were checked")

    monkeypatch.setattr("orchestrator.runner.build_attack", attack_built)
    monkeypatch.setattr("orchestrator.execute.build_attack", attack_built)  # what a study's builds call
    return started


@pytest.mark.parametrize("command", ["tune", "study"])
def test_more_cpus_per_trial_than_a_cluster_node_has_is_refused_before_the_attack(
    command, fake_cluster, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    target = str(SPACES / "ft.yaml") if command == "tune" else str(STUDY)
    # the limit: tune imports Ray Tune before it asks the cluster, as connecting to it would
    refused(
        [command, target, "--address", "head:6379", "--cpus-per-trial", "12"],
        capsys,
        "--cpus-per-trial 12: the largest node of the Ray cluster at head:6379 has 8 CPUs",
        limit=30,
    )
    refused([command, target, "--address", "head:6379", "--gpus-per-trial", "1"], capsys, "no node has a GPU", limit=30)
    assert fake_cluster == ["head:6379", "head:6379"]  # checked once connected, not before
    assert listing(tmp_path) == []


# ------------------------------------------------------------------------------------ damaged mlflow.db
def _damaged(tmp_path: Path, how: str) -> Path:
    db = tmp_path / "mlflow.db"
    if how == "garbage":
        db.write_bytes(os.urandom(4096))
        return db
    connection = sqlite3.connect(db)
    connection.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, payload TEXT)")
    connection.executemany("INSERT INTO runs (payload) VALUES (?)", [("x" * 500,)] * 400)
    connection.commit()
    connection.close()
    blob = db.read_bytes()
    db.write_bytes(blob[: len(blob) // 2])  # a copy or sync that stopped halfway
    return db


@pytest.mark.parametrize(
    "how,says", [("truncated", "database disk image is malformed"), ("garbage", "file is not a database")]
)
def test_a_damaged_store_is_named_with_the_fix_and_kept(how, says, tmp_path, monkeypatch, capsys):
    db = _damaged(tmp_path, how)
    before = db.read_bytes()
    monkeypatch.chdir(tmp_path)
    # in a fresh process each: in the full suite this process holds MLflow stores and a Ray from earlier tests
    for argv in (
        ["attack", "badnets", "--set", "epochs=1"],
        ["tune", str(SPACES / "ft.yaml"), "--quick"],
        ["report"],
        ["ui", "--port", "5999"],
    ):
        err = refused_in_a_fresh_process(argv, tmp_path, says)
        assert f"{db} is not a readable SQLite database" in err and f"mv {db} {db}.damaged" in err, err
    assert listing(tmp_path) == ["mlflow.db"] and db.read_bytes() == before


def test_an_empty_store_file_is_not_damaged(tmp_path):
    from orchestrator.tracking import sqlite_damage

    (tmp_path / "mlflow.db").write_bytes(b"")
    assert sqlite_damage(tmp_path / "mlflow.db") is None


def test_opening_a_damaged_store_says_so_in_one_line(tmp_path):
    """The same line where the store is opened (a damaged store that a command did not check first)."""
    from orchestrator.errors import BadInput
    from orchestrator.tracking import Tracker

    db = _damaged(tmp_path, "garbage")
    with pytest.raises(BadInput, match="is not a readable SQLite database .file is not a database.; bdo never"):
        Tracker(f"sqlite:///{db}", "bdo")


# ------------------------------------------------------------------------------- corrupt attack-cache entry
def test_a_corrupt_cache_entry_is_named_moved_aside_and_rebuilt(tmp_path, capsys):
    from orchestrator.cache import AttackCache, write_checksums

    cache = AttackCache(tmp_path)
    entry = cache.entry("k" * 20)
    entry.mkdir()
    (entry / "backdoor.safetensors").write_bytes(b"w" * 4096)
    (entry / "backdoor.json").write_text("{}")
    write_checksums(entry)
    (entry / "backdoor.safetensors").write_bytes(b"w" * 1000)  # truncated
    assert cache.load("k" * 20) is None
    aside = [p for p in cache.root.iterdir() if p.name.startswith("k" * 20 + ".corrupt-")]
    assert len(aside) == 1 and (aside[0] / "backdoor.safetensors").read_bytes() == b"w" * 1000  # kept, not deleted
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{entry} is corrupt: backdoor.safetensors does not match its checksum" in err, err
    assert f"moved it to {aside[0]}" in err and "rebuilding" in err, err


# ----------------------------------------------------------------------------- first use of a fresh store
def open_fresh_store(uri: str, barrier, results) -> None:
    from orchestrator.tracking import Tracker

    barrier.wait()  # both find no store, and both would create MLflow's tables
    try:
        Tracker(uri, experiment="bdo")
        results.put("ok")
    except Exception as error:  # reported to the test, which names it
        results.put(f"{type(error).__name__}: {str(error)[:300]}")


def test_two_commands_creating_one_fresh_store_both_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    openers = [context.Process(target=open_fresh_store, args=(uri, barrier, results)) for _ in range(2)]
    for opener in openers:
        opener.start()
    for opener in openers:
        opener.join(timeout=240)
    assert [results.get(timeout=5) for _ in openers] == ["ok", "ok"]
    assert listing(tmp_path) == ["mlflow.db"]  # the creation lock is gone
    from orchestrator.tracking import Tracker

    assert Tracker(uri).client.get_experiment_by_name("bdo") is not None
