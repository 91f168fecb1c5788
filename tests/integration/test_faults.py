"""Fault tolerance: a trial process killed mid-run, a worker node lost mid-sweep, the driver killed mid-sweep and
resumed, and writes that a kill can interrupt (checkpoints, attack cache entries, Parquet files).

The trial kill runs in-process on the session's Ray. The node and driver tests run their clusters and drivers in
subprocesses (helpers in test_multinode.py), so they never touch the pytest process's Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.cli import main
from tests.integration.conftest import runs
from tests.integration.test_multinode import (
    SPACES,
    bdo_command,
    child_env,
    experiment_runs,
    explain,
    kill_marked,
    mlflow_server,
    ray_cluster,
    run_bdo,
    short_tmp,
    tail,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# Pinned values: with nothing left to sample, two sweeps train the very same model.
PINNED = ["--set", "poison_rate=0.1", "--set", "lr=0.05"]


class Killed(BaseException):
    """Stands in for SIGKILL inside this process: nothing after the raise runs, and no `except Exception` catches it."""


def model_digest(client, run_id: str, into: Path) -> str:
    from safetensors.torch import load_file

    from orchestrator.execute import weights_digest

    path = client.download_artifacts(run_id, "model/model.safetensors", str(into))
    return weights_digest(load_file(path))


def steps(client, run_id: str, key: str = "val_acc") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def tune_trial_status(storage: Path) -> dict[str, str]:
    """Trial id -> status as Tune last persisted it (what a resumed sweep starts from). A resumed sweep writes a
    new state file next to the old one, so only the newest counts: newest by the start time in its name, as Tune
    picks it, never by mtime, because the resumed sweep's syncs copy the old file up again."""
    try:
        states = sorted(storage.glob("tune/*/experiment_state-*.json"), key=lambda p: p.name)
        if not states:
            return {}
        return {
            trial["trial_id"]: trial["status"]
            for trial in (json.loads(t) for t, _ in json.loads(states[-1].read_text())["trial_data"])
        }
    except (OSError, ValueError, KeyError):  # caught mid-rewrite; the next poll reads it whole
        return {}


# --- a trial's process is SIGKILLed -------------------------------------------------------------------------------


def test_killed_trial_retries_from_its_checkpoint_and_ends_bit_identical(ray_session, workdir, tmp_path, monkeypatch):
    common = [
        "tune",
        str(SPACES / "badnets.yaml"),
        "--num-samples",
        "1",
        "--set",
        "epochs=3",
        "--max-failures",
        "1",
        *PINNED,
    ]
    marker = tmp_path / "fault" / "fired"
    marker.parent.mkdir()
    monkeypatch.setenv("BDO_FAULT", f"kill:step=2:trial=0:once={marker}")
    assert main(common + ["--experiment", "interrupted"]) == 0
    assert marker.exists(), "the trial process was never killed"
    monkeypatch.delenv("BDO_FAULT")
    assert main(common + ["--experiment", "clean"]) == 0

    client, (sweep,) = runs(workdir, "interrupted", "tags.role = 'sweep'")
    children = client.search_runs([sweep.info.experiment_id], f"tags.mlflow.parentRunId = '{sweep.info.run_id}'")
    assert [c.info.status for c in children] == ["FINISHED"], "one run per trial, reopened by the retry"
    killed = children[0]
    # the run counts the retry as its second attempt; both on this machine's one node
    tags = killed.data.tags
    assert tags["attempt"] == "2" and tags["attempt_1_node"] == tags["attempt_2_node"] == tags["node"], tags
    # the retry started from step 1's checkpoint, not from scratch; step 2, logged just before the kill and trained
    # again by the retry, is logged once
    assert tags["resumed_at_step"] == "1" and steps(client, killed.info.run_id) == [1, 2, 3]
    _, (clean,) = runs(workdir, "clean", "tags.role = 'trial'")
    assert clean.info.status == "FINISHED" and steps(client, clean.info.run_id) == [1, 2, 3]

    digests = {model_digest(client, r.info.run_id, tmp_path / r.info.run_id) for r in (killed, clean)}
    assert len(digests) == 1, "the retried trial must end with the uninterrupted run's weights, bit for bit"
    for key in ("val_acc", "val_asr", "test_acc", "test_asr"):
        assert killed.data.metrics[key] == clean.data.metrics[key], key


# --- a worker node dies -------------------------------------------------------------------------------------------


def test_sweep_survives_losing_a_worker_node(tmp_path, mlflow_template):
    from mlflow.tracking import MlflowClient

    work = tmp_path / "driver"
    work.mkdir()
    log = tmp_path / "driver.log"
    with (
        mlflow_server(tmp_path / "mlflow", mlflow_template) as server,
        ray_cluster(tmp_path, head_cpus=1, worker_cpus=(1,)) as cluster,
    ):
        url = server.ready()
        args = [
            "tune",
            str(SPACES / "badnets.yaml"),
            "--num-samples",
            "2",
            "--cpus-per-trial",
            "1",
            "--set",
            "epochs=4",
            "--max-failures",
            "2",
            *PINNED,
            "--address",
            cluster.address,
            "--tracking-uri",
            url,
            "--storage",
            str(tmp_path / "shared"),
            "--shared-storage",
        ]
        # both trials hold at step 2 until the worker is gone, so the one on the worker is surely mid-run
        release = tmp_path / "release"
        with open(log, "w") as out:
            driver = subprocess.Popen(
                bdo_command(*args),
                cwd=work,
                env=child_env(cluster.ray_tmp, BDO_FAULT=f"wait:step=2:until={release}"),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            client = MlflowClient(url)
            worker = cluster.workers[0]

            def trial_on_worker_trained():
                if driver.poll() is not None:
                    raise AssertionError(f"the sweep ended before the node was lost\n{tail(log)}")
                exp = client.get_experiment_by_name("bdo")
                trials = client.search_runs([exp.experiment_id], "tags.role = 'trial'") if exp else []
                on = {t.data.tags.get("ray_node_id"): t for t in trials}
                if set(on) == {cluster.head, worker} and steps(client, on[worker].info.run_id):
                    return on[worker].info.run_id
                return None

            moved = wait_until(
                trial_on_worker_trained, 240, "a trial training on each node", poll=1.0, why=lambda: tail(log)
            )
            cluster.kill_worker(0)
            release.touch()
            driver.wait(300)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
        assert driver.returncode == 0, tail(log, 80)

        (sweep,) = experiment_runs(client, "tags.role = 'sweep'")
        assert sweep.info.status == "FINISHED"
        trials = experiment_runs(client, f"tags.mlflow.parentRunId = '{sweep.info.run_id}'")
        assert sorted(t.info.status for t in trials) == ["FINISHED", "FINISHED"]
        assert {t.data.tags["ray_node_id"] for t in trials} == {cluster.head}, "both trials end on the surviving node"
        history = steps(client, moved)
        assert history[-1] == 4 and set(history) == set(range(1, 5)), history
        # the moved trial's run says where each attempt ran: the lost worker first, then the head
        tags = client.get_run(moved).data.tags
        attempts = int(tags["attempt"])
        assert attempts >= 2 and tags["attempt_1_node"] == worker, tags
        assert tags["node"] == tags[f"attempt_{attempts}_node"] == cluster.head, tags
        assert all(tags[f"attempt_{n}_node_ip"] == "127.0.0.1" for n in range(1, attempts + 1)), tags
        assert {"config.yaml", "model"} <= {a.path for a in client.list_artifacts(moved)}


# --- the driver is SIGKILLed, then the sweep is resumed -------------------------------------------------------------


def test_driver_killed_mid_sweep_then_resume_finishes_it(tmp_path, mlflow_template):
    from mlflow.tracking import MlflowClient

    work = tmp_path / "driver"
    work.mkdir()
    shutil.copy(mlflow_template, work / "mlflow.db")
    storage = work / "bdo_runs"
    args = [
        "tune",
        str(SPACES / "badnets.yaml"),
        "--num-samples",
        "2",
        "--max-concurrent",
        "1",
        "--cpus-per-trial",
        "1",
        "--set",
        "epochs=3",
        *PINNED,
    ]
    ray_tmp = short_tmp()
    log = tmp_path / "driver.log"
    # the second trial holds at step 2 (after step 1's checkpoint) until released, so the kill surely lands
    # mid-trial however fast a warm, reused trial process trains
    release = tmp_path / "release"
    hold = f"wait:step=2:trial=1:until={release}"
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    driver = None
    try:
        with open(log, "w") as out:
            driver = subprocess.Popen(
                bdo_command(*args),
                cwd=work,
                env=child_env(ray_tmp, BDO_FAULT=hold),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def one_done_one_training():
            if driver.poll() is not None:
                raise AssertionError(f"the sweep ended before the driver was killed\n{tail(log)}")
            tune_status = tune_trial_status(storage)
            if "TERMINATED" not in tune_status.values():
                return None
            exp = client.get_experiment_by_name("bdo")
            trials = client.search_runs([exp.experiment_id], "tags.role = 'trial'")
            # the training trial must be in Tune's persisted state too; one it never saved is not resumable
            running = [
                t
                for t in trials
                if t.info.status == "RUNNING"
                and t.data.tags.get("trial_id") in tune_status
                and steps(client, t.info.run_id)
            ]
            return (tune_status, trials) if running else None

        before_status, before = wait_until(
            one_done_one_training, 300, "one trial done and the next one training", poll=0.5, why=lambda: tail(log)
        )
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(30)
        # what dies with a driver's host: its local Ray (some of whose agents outlive a SIGKILLed driver)
        kill_marked(ray_tmp)

        finished_before = {
            t.data.tags["trial_id"]: t for t in before if before_status.get(t.data.tags["trial_id"]) == "TERMINATED"
        }
        assert finished_before and all(t.info.status == "FINISHED" for t in finished_before.values())
        orphans = [r for r in experiment_runs(client, "tags.role = 'trial'") if r.info.status == "RUNNING"]
        assert orphans, "the kill should have left the training trial's run RUNNING"

        release.touch()
        done = run_bdo(args + ["--resume"], work, child_env(ray_tmp), timeout=400)
        assert done.returncode == 0, explain(done)
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
            driver.wait()
        kill_marked(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    (sweep,) = experiment_runs(client, "tags.role = 'sweep'")  # resumed, not a second sweep
    assert sweep.info.status == "FINISHED"
    children = experiment_runs(client, f"tags.mlflow.parentRunId = '{sweep.info.run_id}'")
    tune_status = tune_trial_status(storage)
    assert sorted(tune_status.values()) == ["TERMINATED", "TERMINATED"], tune_status
    for trial_id in tune_status:
        mine = [c for c in children if c.data.tags.get("trial_id") == trial_id]
        assert [c.info.status for c in mine] == ["FINISHED"], f"trial {trial_id}: {[c.info.status for c in mine]}"
    leftover = {c.info.status for c in children if c.data.tags.get("trial_id") not in tune_status}
    assert leftover <= {"KILLED", "FAILED"}, f"runs Tune no longer knows must be closed, not {leftover}"
    assert "RUNNING" not in {c.info.status for c in children}

    for orphan in orphans:  # reopened and finished by its resumed trial, or closed as KILLED
        assert client.get_run(orphan.info.run_id).info.status in ("FINISHED", "KILLED", "FAILED")
    for trial_id, run in finished_before.items():  # finished trials are not rerun
        now = client.get_run(run.info.run_id)
        assert now.info.status == "FINISHED" and now.info.end_time == run.info.end_time, trial_id
        assert steps(client, run.info.run_id) == [1, 2, 3]
    assert f"sweep run {sweep.info.run_id}" in done.stdout


# --- writes a kill can interrupt ------------------------------------------------------------------------------------


class HalfWriter:
    """A file whose first write stores half of its bytes and then 'dies'."""

    def __init__(self, real) -> None:
        self.real = real

    def write(self, blob: bytes) -> int:
        self.real.write(blob[: len(blob) // 2])
        self.real.flush()
        raise Killed

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.real.close()


def test_checkpoint_write_killed_halfway_leaves_the_previous_one(tmp_path, monkeypatch):
    import orchestrator.context as context_module
    from orchestrator.context import Reporter, TrackedContext, atomic_write_bytes

    path = tmp_path / "ckpt" / "state.pt"
    atomic_write_bytes(path, b"good" * 1000)
    monkeypatch.setattr(context_module, "open", lambda *a, **k: HalfWriter(open(*a, **k)), raising=False)
    with pytest.raises(Killed):
        atomic_write_bytes(path, b"torn" * 1000)
    with pytest.raises(Killed):
        atomic_write_bytes(tmp_path / "ckpt" / "never.pt", b"torn" * 1000)
    monkeypatch.undo()
    assert path.read_bytes() == b"good" * 1000, "the old checkpoint survives a kill while the new one is written"
    assert not (tmp_path / "ckpt" / "never.pt").exists()
    partial = [p.name for p in path.parent.iterdir() if p.name not in ("state.pt",)]
    assert partial and all(name.startswith(".") and ".tmp-" in name for name in partial), partial

    # through the context: a checkpoint torn mid-write never reaches the reporter, the last whole one stays
    ctx = TrackedContext(device=torch.device("cpu"), run_id=None, tracker=None, reporter=Reporter())
    ctx.report({"val_acc": 0.5}, 1)
    ctx.save_state({"step": 1, "weights": torch.arange(4096, dtype=torch.float32)})
    ctx.report({"val_acc": 0.6}, 2)
    monkeypatch.setattr(context_module, "open", lambda *a, **k: HalfWriter(open(*a, **k)), raising=False)
    with pytest.raises(Killed):
        ctx.save_state({"step": 2, "weights": torch.zeros(4096)})
    monkeypatch.undo()
    state = ctx.load_state()
    assert state["step"] == 1 and torch.equal(state["weights"], torch.arange(4096, dtype=torch.float32))


def test_attack_cache_entry_killed_mid_write_is_never_loaded(tmp_path):
    from orchestrator.cache import AttackCache
    from tests.conftest import train_backdoor

    backdoor = train_backdoor("badnets", epochs=1)
    cache = AttackCache(tmp_path)
    key = "k" * 20

    class DiesWhileSaving:
        def save(self, directory: Path) -> None:
            backdoor.save(directory)
            tensors = directory / "backdoor.safetensors"
            with open(tensors, "r+b") as f:  # the kill lands while the tensors are being written
                f.truncate(tensors.stat().st_size // 2)
            raise Killed

    with pytest.raises(Killed):
        cache.get_or_build(key, lambda: (DiesWhileSaving(), {"attack_run_id": "killed"}))
    assert not cache.entry(key).exists(), "a torn entry must never appear under its key"
    assert [p.name.startswith(f".{key}.tmp-") for p in cache.root.iterdir()] == [True]
    assert AttackCache(tmp_path).load(key) is None

    built, meta, now = cache.get_or_build(key, lambda: (backdoor, {"attack_run_id": "good"}))
    assert now and meta["attack_run_id"] == "good"
    loaded = AttackCache(tmp_path).load(key)
    assert loaded is not None
    assert all(torch.equal(loaded.model_state[k], backdoor.model_state[k]) for k in backdoor.model_state)

    # an entry damaged in place (a partial copy onto shared storage, a disk error) fails its checksums: it is
    # moved aside and rebuilt, never used
    tensors = cache.entry(key) / "backdoor.safetensors"
    blob = tensors.read_bytes()
    tensors.write_bytes(blob[: len(blob) // 2])
    assert AttackCache(tmp_path).load(key) is None
    assert any(p.name.startswith(f"{key}.corrupt-") for p in cache.root.iterdir())
    rebuilt, meta, now = cache.get_or_build(key, lambda: (backdoor, {"attack_run_id": "rebuilt"}))
    assert now and meta["attack_run_id"] == "rebuilt"


def test_parquet_write_killed_halfway_leaves_the_previous_file(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.context import write_parquet_atomic

    path = tmp_path / "scores.parquet"
    good = {"score": np.linspace(0, 1, 500), "pool": np.arange(500) % 3}
    write_parquet_atomic(path, good)
    real_write = pq.write_table

    def dies_halfway(table, where, **kwargs):
        sink = pa.BufferOutputStream()
        real_write(table, sink, **kwargs)
        blob = sink.getvalue().to_pybytes()
        Path(where).write_bytes(blob[: len(blob) // 2])
        raise Killed

    monkeypatch.setattr(pq, "write_table", dies_halfway)
    with pytest.raises(Killed):
        write_parquet_atomic(path, {"score": np.zeros(500), "pool": np.zeros(500, dtype=int)})
    with pytest.raises(Killed):
        write_parquet_atomic(tmp_path / "never.parquet", good)
    monkeypatch.undo()

    assert not (tmp_path / "never.parquet").exists()
    back = pq.read_table(path).to_pydict()
    assert np.array_equal(back["score"], good["score"]) and np.array_equal(back["pool"], good["pool"])
    torn = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(torn) == 2
    for p in torn:  # what a kill leaves is hidden under a temporary name, and is indeed not a readable file
        with pytest.raises((OSError, pa.ArrowException)):
            pq.read_table(p)
