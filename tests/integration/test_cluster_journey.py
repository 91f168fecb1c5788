"""The README's cluster journey (section 5), on this machine: a head and a worker started with `ray start` the way
cluster.yaml's start commands start them (the venv first on PATH; the tracking server, storage and data folders
exported before `ray start`, so jobs inherit them), an `mlflow server` as the head runs it, and jobs submitted with
the README's own `ray job submit --address http://127.0.0.1:8265 --working-dir . ... -- bdo tune ...`. What differs
from a cloud cluster: loopback is the head's address, a folder both local nodes see stands for /shared (declared
with BDO_SHARED_STORAGE=1, as a mount bdo does not recognize would be), no GPU (--gpus-per-trial 0), token auth
off, and a quick FT sweep instead of 32 D-BR trials.

The journey: a job runs a sweep to the end and its runs, metrics and an artifact are read back over HTTP; a second
job is stopped with `ray job stop` mid-sweep and its records end KILLED; a third job resumes it cleanly (no
rerun of the finished trial, no duplicate metric step, no traceback). Every process the test starts is killed by
PID at the end (kill_marked: the ones whose environment carries this test's RAY_TMPDIR), never with `ray stop`,
which would also stop any other Ray on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.ui import free_port
from tests.integration.test_multinode import (
    child_env,
    experiment_runs,
    kill_marked,
    kill_with_env,
    mlflow_server,
    short_tmp,
    tail,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent  # the venv's bin, which cluster.yaml puts first on PATH
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def path_without_the_venv() -> str:
    """PATH as a fresh login shell on a cluster node has it: without the venv, so that only cluster.yaml's export
    can make `bdo` resolvable for a job (the README's job command failed with exit 127 before it did)."""
    return os.pathsep.join(
        p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != VENV_BIN.resolve()
    )


def private_address() -> str | None:
    """This machine's first address as cluster.yaml's start commands read it (`hostname -I`)."""
    try:
        words = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return next((w for w in words if "." in w and not w.startswith("127.")), None)


def node_ports(host: str) -> list[str]:
    """Two raylets on one host must not share the per-node agent ports (a cloud node has the host to itself)."""
    return [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--object-store-memory={100 * 1024**2}",
        "--num-cpus=1",
        f"--node-ip-address={host}",
        "--disable-usage-stats",
    ]


@dataclass
class StartedCluster:
    address: str  # the dashboard's, what `ray job submit` takes
    shell: dict[str, str]  # the environment of a user's shell on the head
    log: Path

    def lose_the_worker(self) -> int:
        """The worker machine lost: SIGKILL its raylet and every process of it at once (a machine that goes away
        takes its trials' processes along; killing the raylet alone lets them train on for a moment and log a step
        the retry logs again). Returns how many processes went."""
        return len(kill_with_env(f"{WORKER_MARK}=1"))


WORKER_MARK = "BDO_JOURNEY_WORKER_NODE"  # in the environment of the worker's `ray start`, so of all its processes


@contextmanager
def ray_start_cluster(tmp: Path, host: str, exported: dict[str, str]) -> Iterator[StartedCluster]:
    """A head and a worker from `ray start`, with cluster.yaml's exports in their environment."""
    ray_tmp, worker_tmp = short_tmp(), short_tmp()
    log = tmp / "ray-start.log"
    # Ray's own default on Linux: the nodes find each other by their private address, not loopback (BASE_ENV)
    env = child_env(
        ray_tmp,
        PATH=f"{VENV_BIN}{os.pathsep}{path_without_the_venv()}",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1",
        **exported,
    )
    gcs, dashboard = free_port(), free_port()
    ray = str(VENV_BIN / "ray")
    try:
        # the head's private address, as cluster.yaml's `hostname -I` gives it: a worker's `ray start` rewrites a
        # loopback head address to this host's outward one, where a head bound to loopback does not listen
        with open(log, "w") as out:
            for args in (
                [
                    "--head",
                    f"--port={gcs}",
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard}",
                    f"--ray-client-server-port={free_port()}",
                    f"--temp-dir={ray_tmp}",
                ],
                # its own temp dir, as a worker machine has its own disk: in the head's, the worker's
                # runtime-env agent deletes the job's unpacked working dir (the driver's cwd) when a task
                # of the job ends there
                [f"--address={host}:{gcs}", f"--temp-dir={worker_tmp}"],
            ):
                node_env = {**env, WORKER_MARK: "1"} if "--head" not in args else env
                done = subprocess.run(
                    [ray, "start", *args, *node_ports(host)],
                    env=node_env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    timeout=240,
                )
                assert done.returncode == 0, f"ray start {args[0]} failed\n{tail(log)}"
        yield StartedCluster(f"http://127.0.0.1:{dashboard}", env, log)
    finally:
        kill_marked(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        shutil.rmtree(worker_tmp, ignore_errors=True)


def ray_job(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`ray job ...` typed in a shell on the head, in the repository (the README's --working-dir .)."""
    return subprocess.run(
        [str(VENV_BIN / "ray"), "job", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def steps(client, run_id: str) -> list[int]:
    return [m.step for m in sorted(client.get_metric_history(run_id, "val_acc"), key=lambda m: m.step)]


def test_the_readme_cluster_journey_runs_as_written(tmp_path, mlflow_template):
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    host = private_address()
    if host is None:
        pytest.skip("this machine has no private IPv4 address (hostname -I) for the head to listen on")
    shared = tmp_path / "shared"
    release = tmp_path / "release"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    with mlflow_server(tmp_path / "mlflow", mlflow_template) as server:
        url = server.ready()
        exported = {
            "MLFLOW_TRACKING_URI": url,
            "BDO_STORAGE": str(shared / "bdo_runs"),
            "BDO_DATA_ROOT": str(shared / "data"),
            "BDO_SHARED_STORAGE": "1",
        }
        with ray_start_cluster(tmp_path, host, exported) as cluster:
            address, shell, log = cluster.address, cluster.shell, cluster.log
            sweep_command = [
                "--",
                "bdo",
                "tune",
                "search_spaces/ft.yaml",
                "--gpus-per-trial",
                "0",
                "--num-samples",
                "2",
                "--scheduler",
                "asha",
                "--quick",
            ]

            def submit(env_vars: dict[str, str], *extra: str, job_id: str | None = None) -> subprocess.CompletedProcess:
                """The README's command; with job_id, submitted under that id without waiting for it."""
                runtime_env = json.dumps({"env_vars": {"BDO_GIT_COMMIT": commit, **env_vars}})
                return ray_job(
                    shell,
                    "submit",
                    "--address",
                    address,
                    "--working-dir",
                    ".",
                    *([] if job_id is None else ["--no-wait", "--submission-id", job_id]),
                    "--runtime-env-json",
                    runtime_env,
                    *sweep_command,
                    *extra,
                )

            # 1. the README's command, waited on as written: the job finds bdo and the sweep finishes
            first = submit({})
            assert first.returncode == 0, f"{first.stdout[-4000:]}\n{first.stderr[-3000:]}\n{tail(log)}"
            assert "Traceback" not in first.stdout, first.stdout[-4000:]
            client = MlflowClient(url)
            (sweep,) = experiment_runs(client, "tags.role = 'sweep'")
            assert sweep.info.status == "FINISHED" and sweep.data.tags.get("git_commit") == commit, sweep.data.tags
            trials = experiment_runs(client, f"tags.mlflow.parentRunId = '{sweep.info.run_id}'")
            assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials)
            for trial in trials:
                assert steps(client, trial.info.run_id) == [1, 2], "one val_acc per epoch of the quick FT"
            config = Path(client.download_artifacts(trials[0].info.run_id, "config.yaml", str(tmp_path)))
            assert "method: ft" in config.read_text(), "the artifact came back over HTTP"

            # 2. a second sweep, stopped with `ray job stop` while its second trial is held after its first step;
            # RAY_JOB_STOP_WAIT_TIME_S gives it the time to wind down that the README says to give
            jobs = JobSubmissionClient(address)
            job_id = "journey-stopped-sweep"
            second = submit(
                {"BDO_FAULT": f"wait:step=1:trial=1:until={release}", "RAY_JOB_STOP_WAIT_TIME_S": "60"}, job_id=job_id
            )
            assert second.returncode == 0, second.stderr[-3000:]

            def one_done_one_held():
                swept = [
                    s for s in experiment_runs(client, "tags.role = 'sweep'") if s.info.run_id != sweep.info.run_id
                ]
                if not swept:
                    return None
                children = experiment_runs(client, f"tags.mlflow.parentRunId = '{swept[0].info.run_id}'")
                done = [t for t in children if t.info.status == "FINISHED"]
                held = [t for t in children if t.info.status == "RUNNING" and steps(client, t.info.run_id) == [1]]
                return (swept[0], done[0], held[0]) if done and held else None

            stopped_sweep, finished, held = wait_until(
                one_done_one_held,
                600,
                "the second job's first trial done and its second held",
                poll=2.0,
                why=lambda: jobs.get_job_logs(job_id)[-3000:],
            )
            stop = ray_job(shell, "stop", "--address", address, job_id)
            assert stop.returncode == 0, stop.stderr[-2000:]
            wait_until(
                lambda: jobs.get_job_status(job_id) in (JobStatus.STOPPED, JobStatus.FAILED),
                120,
                "the stopped job to end",
                why=lambda: jobs.get_job_logs(job_id)[-3000:],
            )
            assert jobs.get_job_status(job_id) == JobStatus.STOPPED
            assert client.get_run(stopped_sweep.info.run_id).info.status == "KILLED", jobs.get_job_logs(job_id)[-3000:]
            assert client.get_run(held.info.run_id).info.status == "KILLED", "the cut trial"
            assert client.get_run(finished.info.run_id).info.status == "FINISHED"

            # 3. the same command with --resume continues that sweep: nothing rerun, no step logged twice
            release.touch()
            resumed = submit({}, "--resume")
            assert resumed.returncode == 0, f"{resumed.stdout[-4000:]}\n{resumed.stderr[-3000:]}"
            assert "Traceback" not in resumed.stdout, resumed.stdout[-4000:]
            assert client.get_run(stopped_sweep.info.run_id).info.status == "FINISHED"
            children = experiment_runs(client, f"tags.mlflow.parentRunId = '{stopped_sweep.info.run_id}'")
            assert sorted(c.info.status for c in children) == ["FINISHED", "FINISHED"]
            again = client.get_run(finished.info.run_id)
            assert again.info.end_time == finished.info.end_time, "the trial finished before the stop was rerun"
            for child in children:
                assert steps(client, child.info.run_id) == [1, 2], (
                    child.data.tags.get("trial_id"),
                    steps(client, child.info.run_id),
                )

            # 4. the worker machine lost mid-sweep (its raylet and processes killed) while each node holds a trial
            # after step 1:
            # the lost trial is retried on the head and the job still succeeds; its run keeps both attempts
            lost_release = tmp_path / "release-lost"
            job_id = "journey-lost-worker"
            fourth = submit({"BDO_FAULT": f"wait:step=1:until={lost_release}"}, job_id=job_id)
            assert fourth.returncode == 0, fourth.stderr[-3000:]
            earlier = {sweep.info.run_id, stopped_sweep.info.run_id}

            def both_held():
                swept = [s for s in experiment_runs(client, "tags.role = 'sweep'") if s.info.run_id not in earlier]
                if not swept:
                    return None
                children = experiment_runs(client, f"tags.mlflow.parentRunId = '{swept[0].info.run_id}'")
                held = [t for t in children if t.info.status == "RUNNING" and steps(client, t.info.run_id) == [1]]
                return swept[0] if len(held) == 2 else None

            lost_sweep = wait_until(
                both_held,
                600,
                "both trials of the fourth job held after step 1",
                poll=2.0,
                why=lambda: jobs.get_job_logs(job_id)[-3000:],
            )
            assert cluster.lose_the_worker() > 1, "the worker's raylet and its trial's processes"
            lost_release.touch()
            wait_until(
                lambda: jobs.get_job_status(job_id) in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED),
                600,
                "the fourth job to end",
                why=lambda: jobs.get_job_logs(job_id)[-3000:],
            )
            assert jobs.get_job_status(job_id) == JobStatus.SUCCEEDED, jobs.get_job_logs(job_id)[-5000:]
            assert client.get_run(lost_sweep.info.run_id).info.status == "FINISHED"
            children = experiment_runs(client, f"tags.mlflow.parentRunId = '{lost_sweep.info.run_id}'")
            assert sorted(c.info.status for c in children) == ["FINISHED", "FINISHED"]
            (retried,) = [c for c in children if c.data.tags.get("attempt") == "2"]
            assert retried.data.tags["attempt_1_node"] != retried.data.tags["attempt_2_node"], retried.data.tags
            for child in children:
                assert steps(client, child.info.run_id) == [1, 2], (
                    child.data.tags.get("trial_id"),
                    steps(client, child.info.run_id),
                )
