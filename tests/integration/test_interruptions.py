"""Stopping bdo with a signal: SIGINT (Ctrl-C), SIGTERM (`ray job stop`, kill) and SIGHUP (a closed terminal) are an
interruption, not a success or a failure. Real signals go to real `bdo` subprocesses, each in its own session (so
the signal reaches its process group as a terminal's would); every test kills what it started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from orchestrator.ui import free_port
from tests.integration.test_multinode import (
    SPACES,
    bdo_command,
    child_env,
    experiment_runs,
    explain,
    kill_marked,
    processes_with_env,
    run_bdo,
    short_tmp,
    tail,
    wait_until,
)


def steps(client, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "val_acc"))


def command_line(pid: int) -> str:
    """The process's command line, "" once it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def is_ray_agent(pid: int) -> bool:
    return command_line(pid).startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent"))


def kill_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)


@pytest.mark.slow
@pytest.mark.timeout(900)
# Ctrl-C signals the terminal's whole process group, and so does a closed terminal (SIGHUP); SIGTERM goes to bdo alone
# as `kill`, `timeout`, a container's stop or `ray job stop` send it, and to the whole group from systemd or a batch
# scheduler. The local Ray that bdo starts has a session of its own, so a group-wide signal reaches bdo only and the
# sweep winds down (before, SIGHUP and a group SIGTERM ended Ray's GCS and raylet at once).
@pytest.mark.parametrize(
    "sig, code, kill",
    [
        (signal.SIGINT, 130, os.killpg),
        (signal.SIGTERM, 143, os.kill),
        (signal.SIGTERM, 143, os.killpg),
        (signal.SIGHUP, 129, os.killpg),
    ],
    ids=["SIGINT", "SIGTERM", "SIGTERM-group", "SIGHUP-group"],
)
def test_interrupted_sweep_ends_killed_and_resumes(tmp_path, mlflow_template, sig, code, kill):
    from mlflow.tracking import MlflowClient

    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "tune",
        str(SPACES / "badnets.yaml"),
        "--num-samples",
        "3",
        "--max-concurrent",
        "1",
        "--cpus-per-trial",
        "1",
        "--set",
        "epochs=3",
        "--set",
        "data.train_limit=200",
        "--storage",
        str(tmp_path / "bdo_runs"),
        "--tracking-uri",
        uri,
    ]
    ray_tmp = short_tmp()
    log = tmp_path / "driver.log"
    # the second trial holds at step 2 until released, so the signal surely lands mid-trial
    release = tmp_path / "release"
    client = MlflowClient(uri)
    driver = None
    try:
        with open(log, "w") as out:
            driver = subprocess.Popen(
                bdo_command(*args),
                cwd=tmp_path,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child_env(ray_tmp, BDO_FAULT=f"wait:step=2:trial=1:until={release}"),
                start_new_session=True,
            )

        def one_done_one_held():
            if driver.poll() is not None:
                raise AssertionError(f"the sweep ended before the signal\n{tail(log)}")
            exp = client.get_experiment_by_name("bdo")
            trials = client.search_runs([exp.experiment_id], "tags.role = 'trial'") if exp else []
            done = [t for t in trials if t.info.status == "FINISHED"]
            held = [t for t in trials if t.info.status == "RUNNING" and 2 in steps(client, t.info.run_id)]
            return (done, held) if done and held else None

        (finished,), (held,) = wait_until(
            one_done_one_held, 400, "one trial done and the next one held", poll=1.0, why=lambda: tail(log)
        )
        kill(driver.pid, sig)
        driver.wait(180)
        assert driver.returncode == code, f"exit {driver.returncode}\n{tail(log, 80)}"

        (sweep,) = experiment_runs(client, "tags.role = 'sweep'")
        assert sweep.info.status == "KILLED"
        assert not [k for k in sweep.data.metrics if k.startswith("best_")], sweep.data.metrics
        assert not [k for k in sweep.data.params if k.startswith("best.")] and "best_trial_id" not in sweep.data.tags
        assert client.get_run(held.info.run_id).info.status == "KILLED", "the cut trial"
        assert client.get_run(finished.info.run_id).info.status == "FINISHED"
        printed = log.read_text()
        assert f"{held.data.tags['trial_id']:<21} cut" in printed, tail(log, 80)

        release.touch()
        done = run_bdo(args + ["--resume"], tmp_path, child_env(ray_tmp), timeout=400)
        assert done.returncode == 0, explain(done)
    finally:
        if driver is not None:
            kill_group(driver)
        kill_marked(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    (resumed,) = experiment_runs(client, "tags.role = 'sweep'")  # the same sweep, continued
    assert resumed.info.run_id == sweep.info.run_id and resumed.info.status == "FINISHED"
    assert any(k.startswith("best_") for k in resumed.data.metrics)
    children = experiment_runs(client, f"tags.mlflow.parentRunId = '{sweep.info.run_id}'")
    assert sorted(c.info.status for c in children) == ["FINISHED"] * 3
    again = client.get_run(finished.info.run_id)  # finished before the signal: not rerun
    assert again.info.end_time == finished.info.end_time and steps(client, finished.info.run_id) == [1, 2, 3]
    # the cut trial continued to its last step, and the step it had logged but not checkpointed is not logged twice
    assert steps(client, held.info.run_id) == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.parametrize("kill", [os.kill, os.killpg], ids=["bdo", "group"])
def test_a_killed_sweep_leaves_no_ray_process(tmp_path, mlflow_template, kill):
    """kill -9 of a `bdo tune` that started its own Ray, which runs in a session of its own: Ray's GCS, raylet and
    workers still go with bdo (Ray ties them to it), whether bdo alone or its whole process group is killed."""
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    args = [
        "tune",
        str(SPACES / "badnets.yaml"),
        "--num-samples",
        "3",
        "--max-concurrent",
        "1",
        "--cpus-per-trial",
        "1",
        "--set",
        "epochs=3",
        "--set",
        "data.train_limit=200",
        "--storage",
        str(tmp_path / "bdo_runs"),
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    ray_tmp = short_tmp()
    log = tmp_path / "driver.log"
    driver = None
    try:
        with open(log, "w") as out:
            driver = subprocess.Popen(
                bdo_command(*args),
                cwd=tmp_path,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child_env(ray_tmp),
                start_new_session=True,
            )
        wait_until(
            lambda: driver.poll() is not None or "trial 1/3" in log.read_text(),
            300,
            "the first trial",
            why=lambda: tail(log),
        )
        assert driver.poll() is None, tail(log)
        ours = f"RAY_TMPDIR={ray_tmp}"  # child_env's marker: bdo and every Ray process it started carry it
        assert len(processes_with_env(ours)) > 3, "Ray's processes carry the marker"
        kill(driver.pid, signal.SIGKILL)
        driver.wait(30)
        # Ray's two agents may stay a minute more: when their raylet dies they report it to the GCS, which died
        # too, with a fixed 60 s timeout (ray/_private/process_watcher.py), and only then exit on their own.
        wait_until(
            lambda: not [pid for pid in processes_with_env(ours) if not is_ray_agent(pid)],
            30,
            "every Ray process but the agents to end",
            why=lambda: (
                "still running:\n" + "\n".join(f"{pid}: {command_line(pid)[:200]}" for pid in processes_with_env(ours))
            ),
        )
    finally:
        if driver is not None:
            kill_group(driver)
        kill_marked(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_hung_up_attack_ends_killed_with_exit_129(tmp_path, mlflow_template):
    from mlflow.tracking import MlflowClient

    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log = tmp_path / "attack.log"
    args = [
        "attack",
        "badnets",
        "--set",
        "epochs=500",
        "--set",
        "data.train_limit=200",
        "--storage",
        str(tmp_path / "bdo_runs"),
        "--tracking-uri",
        uri,
    ]
    with open(log, "w") as out:
        attack = subprocess.Popen(
            bdo_command(*args),
            cwd=tmp_path,
            env=child_env(tmp_path),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(
            lambda: attack.poll() is not None or " step 1/500" in log.read_text(),
            240,
            "the first epoch",
            why=lambda: tail(log),
        )
        os.killpg(attack.pid, signal.SIGHUP)
        attack.wait(60)
        assert attack.returncode == 129, tail(log)
    finally:
        kill_group(attack)
    (run,) = experiment_runs(MlflowClient(uri), "tags.role = 'attack'")
    assert run.info.status == "KILLED"


@pytest.mark.slow
@pytest.mark.parametrize(
    "command", [["attack", "badnets"], ["defend", "ft", "--attack", "badnets"]], ids=["attack", "defend"]
)
def test_a_killed_run_is_continued_by_the_same_command(tmp_path, mlflow_template, command):
    """kill -9 of `bdo attack` / `bdo defend` mid-training: the same command continues from the last checkpoint
    to the weights an uninterrupted run gets, in a new run that starts with the killed run's metrics; the killed
    run, left RUNNING by the kill, is closed KILLED and linked to the one that continued it."""
    from mlflow.tracking import MlflowClient

    role = "attack" if command[0] == "attack" else "defense"
    sizes = (
        ["--set", "epochs=4", "--set", "data.train_limit=300"]
        if role == "attack"
        else [
            "--set",
            "epochs=4",
            "--set",
            "clean_ratio=0.2",
            "--set",
            "attack.epochs=2",
            "--set",
            "data.train_limit=300",
        ]
    )

    def where(folder: Path) -> tuple[list[str], MlflowClient]:
        folder.mkdir()
        shutil.copy(mlflow_template, folder / "mlflow.db")
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        return [*command, *sizes, "--storage", str(folder / "bdo_runs"), "--tracking-uri", uri], MlflowClient(uri)

    args, client = where(tmp_path / "killed")
    # SIGKILLed by itself after step 3 is logged, before its checkpoint: the checkpoint on disk closes step 2
    killed = run_bdo(args, tmp_path, child_env(tmp_path, BDO_FAULT="kill:step=3"))
    assert killed.returncode == -signal.SIGKILL, explain(killed)
    (cut,) = experiment_runs(client, f"tags.role = '{role}'")
    assert cut.info.status == "RUNNING" and steps(client, cut.info.run_id) == [1, 2, 3]

    again = run_bdo(args, tmp_path, child_env(tmp_path))
    assert again.returncode == 0, explain(again)
    assert f"run {cut.info.run_id} was cut off; continuing it from step 2" in again.stdout, explain(again)
    runs = {r.info.run_id: r for r in experiment_runs(client, f"tags.role = '{role}'")}
    (continued,) = [r for r in runs.values() if r.info.run_id != cut.info.run_id]
    assert runs[cut.info.run_id].info.status == "KILLED"
    assert runs[cut.info.run_id].data.tags["continued_by_run"] == continued.info.run_id
    assert continued.info.status == "FINISHED" and continued.data.tags["resumed_from_run"] == cut.info.run_id
    assert continued.data.tags["resumed_at_step"] == "2" and steps(client, continued.info.run_id) == [1, 2, 3, 4]
    assert not list((tmp_path / "killed" / "bdo_runs" / "partial").glob(f"{role}-*/*")), "the checkpoint is cleared"

    reference_args, reference_client = where(tmp_path / "uninterrupted")
    reference = run_bdo(reference_args, tmp_path, child_env(tmp_path))
    assert reference.returncode == 0, explain(reference)
    (whole,) = experiment_runs(reference_client, f"tags.role = '{role}'")

    def weights(c: MlflowClient, run_id: str) -> bytes:
        return Path(c.download_artifacts(run_id, "model/model.safetensors", str(tmp_path / run_id))).read_bytes()

    assert weights(client, continued.info.run_id) == weights(reference_client, whole.info.run_id)
    for key in ("val_acc", "test_acc", "test_asr"):
        assert continued.data.metrics[key] == whole.data.metrics[key], key


def _children(pid: int) -> set[int]:
    """Every live descendant of pid (zombies, which nobody may reap in a container, do not count)."""
    found, frontier = set(), [pid]
    while frontier:
        parent = frontier.pop()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == parent and stat[0] != "Z":
                found.add(int(entry))
                frontier.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_ui_stops_its_server_on_a_stop_signal(tmp_path, mlflow_template, sig):
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    port = free_port()
    log = tmp_path / "ui.log"
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    with open(log, "w") as out:
        ui = subprocess.Popen(
            bdo_command("ui", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--port", str(port)),
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server: set[int] = set()
    try:
        wait_until(
            lambda: ui.poll() is not None or "MLflow UI on" in log.read_text(),
            240,
            "the UI to answer",
            why=lambda: tail(log),
        )
        assert ui.poll() is None, tail(log)
        server = _children(ui.pid)
        assert server and _listening(port), "the server runs as bdo's child and listens"
        os.killpg(ui.pid, sig)
        ui.wait(60)
        assert ui.returncode == 0, tail(log)
        deadline = time.monotonic() + 10  # the group is ended before bdo exits; allow the kernel to tidy up
        while time.monotonic() < deadline and (any(_alive(p) for p in server) or _listening(port)):
            time.sleep(0.2)
        assert not [p for p in server if _alive(p)], "the server outlived bdo ui"
        assert not _listening(port)
    finally:
        kill_group(ui)
        for pid in server:  # the server has its own process group
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
