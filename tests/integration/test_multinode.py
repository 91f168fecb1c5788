"""A real multi-node Ray cluster on this machine: a head and a worker raylet on 127.0.0.1, `bdo tune` as a
separate driver process connected to it, run storage on a path every node sees, and MLflow behind a real
`mlflow server`. Everything runs in subprocesses, so the pytest process's own Ray (ray_session) is untouched.

The helpers here (cluster, MLflow server, bdo driver) are shared with test_faults.py.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from orchestrator.ui import free_port, stop_server

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# Runs in its own interpreter and owns the cluster's processes. It prints one JSON line once every node is up,
# then obeys stdin: "kill <i>" removes worker i without a graceful shutdown; end of input tears it all down.
CLUSTER_SCRIPT = r"""
import json, sys
from ray.cluster_utils import Cluster

spec = json.loads(sys.argv[1])
# Notice a dead node within a few seconds instead of Ray's default of half a minute.
health = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
          "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": spec["head_cpus"], "node_ip_address": "127.0.0.1", "include_dashboard": False,
    "object_store_memory": 100 * 1024 ** 2, "_system_config": health})
workers = [cluster.add_node(num_cpus=n, node_ip_address="127.0.0.1", object_store_memory=100 * 1024 ** 2)
           for n in spec["worker_cpus"]]
cluster.wait_for_nodes()
print(json.dumps({"address": cluster.address, "head": cluster.head_node.node_id,
                  "workers": [w.node_id for w in workers]}), flush=True)
for line in sys.stdin:
    words = line.split()
    if words and words[0] == "kill":
        cluster.remove_node(workers[int(words[1])], allow_graceful=False)
        print("killed", flush=True)
cluster.shutdown()
"""

# Ray rewrites a 127.0.0.1 address to the host's outward IP, where a cluster bound to loopback does not listen;
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is the switch that makes it keep loopback as this host's address.
BASE_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_V2_ENABLED": "1",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


def child_env(ray_tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of every Ray-side process a test starts. RAY_TMPDIR keeps Ray's sessions and its
    `ray_current_cluster` file out of /tmp/ray, where a plain ray.init() elsewhere on the machine would find
    our cluster and join it; it also marks the processes so kill_marked() finds exactly ours."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "BDO_FAULT")}
    return {**env, **BASE_ENV, "RAY_TMPDIR": str(ray_tmp), **extra}


def short_tmp() -> Path:
    # Ray puts unix sockets under its temp dir; pytest's tmp_path is too long for the 107-byte socket path limit.
    return Path(tempfile.mkdtemp(prefix="bdo-ray-", dir="/tmp"))


def kill_marked(ray_tmp: Path) -> list[int]:
    """SIGKILL every process whose environment carries our RAY_TMPDIR: Ray workers move to their own session,
    so killing a process group does not reach them, and a SIGKILLed driver leaves agents behind."""
    return kill_with_env(f"RAY_TMPDIR={ray_tmp}")


def processes_with_env(assignment: str) -> list[int]:
    """The pids of every process (but this one) whose environment holds `assignment` (NAME=value)."""
    marker = assignment.encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as handle:
                    if marker in handle.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                continue
    return found


def kill_with_env(assignment: str) -> list[int]:
    """SIGKILL every process (but this one) whose environment holds `assignment` (NAME=value); their pids."""
    killed = []
    for pid in processes_with_env(assignment):
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            continue
    return killed


def wait_until(check: Callable[[], object], timeout: float, what: str, poll: float = 0.5, why: Callable[[], str] = str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{why()}")


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"


class LineReader:
    """Lines of a child's stdout with a timeout (a bare readline would hang the test if the child hangs)."""

    def __init__(self, stream) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put("")

    def next(self, timeout: float) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return ""


class RayCluster:
    def __init__(self, process: subprocess.Popen, reader: LineReader, info: dict, ray_tmp: Path, log: Path) -> None:
        self.process, self.reader, self.ray_tmp, self.log = process, reader, ray_tmp, log
        self.address: str = info["address"]
        self.head: str = info["head"]
        self.workers: list[str] = info["workers"]

    def kill_worker(self, index: int, timeout: float = 60.0) -> None:
        self.process.stdin.write(f"kill {index}\n")
        self.process.stdin.flush()
        assert self.reader.next(timeout).strip() == "killed", f"worker {index} was not removed\n{tail(self.log)}"


@contextmanager
def ray_cluster(
    workdir: Path, head_cpus: int = 1, worker_cpus: tuple[int, ...] = (1,), timeout: float = 180.0
) -> Iterator[RayCluster]:
    ray_tmp = short_tmp()
    log = workdir / "cluster.log"
    spec = json.dumps({"head_cpus": head_cpus, "worker_cpus": list(worker_cpus)})
    with open(log, "w") as err:
        process = subprocess.Popen(
            [sys.executable, "-c", CLUSTER_SCRIPT, spec],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=child_env(ray_tmp),
            cwd=workdir,
            start_new_session=True,
        )
    try:
        reader = LineReader(process.stdout)
        first = reader.next(timeout)
        assert first, f"the Ray cluster did not come up within {timeout:.0f} s\n{tail(log)}"
        yield RayCluster(process, reader, json.loads(first), ray_tmp, log)
    finally:
        try:
            process.stdin.close()  # the helper shuts the cluster down at end of input
            process.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            pass
        stop_server(process, timeout=10)  # its process group, should anything of it outlive it
        kill_marked(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _answers(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url + "/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class MlflowServer:
    def __init__(self, process: subprocess.Popen, url: str, log: Path) -> None:
        self.process, self.url, self.log = process, url, log

    def ready(self, timeout: float = 180.0) -> str:
        """Its URL, once it answers. Separate from starting it, so it boots while the cluster does."""
        wait_until(
            lambda: self.process.poll() is not None or _answers(self.url),
            timeout,
            f"mlflow server on {self.url}",
            why=lambda: tail(self.log),
        )
        assert self.process.poll() is None, f"mlflow server exited with {self.process.returncode}\n{tail(self.log)}"
        return self.url


@contextmanager
def mlflow_server(root: Path, template: Path) -> Iterator[MlflowServer]:
    """`mlflow server` on 127.0.0.1 over a sqlite store (a copy of the pre-migrated template), proxying
    artifacts into root/artifacts: what a head node runs for the other nodes."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(template, root / "mlflow.db")
    (root / "artifacts").mkdir(exist_ok=True)
    port = free_port()
    log = root / "server.log"
    env = {**os.environ, **BASE_ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
    ]
    with open(log, "w") as out:
        process = subprocess.Popen(
            command,
            env=env,
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield MlflowServer(process, f"http://127.0.0.1:{port}", log)
    finally:
        stop_server(process)


def bdo_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", *args]


def run_bdo(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300.0) -> subprocess.CompletedProcess:
    return subprocess.run(bdo_command(*args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def explain(done: subprocess.CompletedProcess) -> str:
    return f"exit {done.returncode}\n--- stdout ---\n{done.stdout[-3000:]}\n--- stderr ---\n{done.stderr[-5000:]}"


def experiment_runs(client, query: str, experiment: str = "bdo") -> list:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} was not created"
    return client.search_runs([exp.experiment_id], filter_string=query, max_results=1000)


def test_sweep_spreads_over_two_nodes_and_logs_to_an_mlflow_server(tmp_path, mlflow_template, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    storage = tmp_path / "shared" / "bdo_runs"  # the path every node would mount
    work = tmp_path / "driver"
    work.mkdir()
    with (
        mlflow_server(tmp_path / "mlflow", mlflow_template) as server,
        ray_cluster(tmp_path, head_cpus=1, worker_cpus=(1,)) as cluster,
    ):
        url = server.ready()
        env = child_env(cluster.ray_tmp)
        done = run_bdo(
            [
                "tune",
                str(SPACES / "badnets.yaml"),
                "--quick",
                "--num-samples",
                "2",
                "--cpus-per-trial",
                "1",
                "--address",
                cluster.address,
                "--tracking-uri",
                url,
                "--storage",
                str(storage),
                "--shared-storage",
            ],
            work,
            env,
        )  # both nodes are this machine: they do see it
        assert done.returncode == 0, explain(done)

        client = MlflowClient(url)
        # MLflow resolves a run's logged model "model" through the global URI; set_tracking_uri exports it as
        # MLFLOW_TRACKING_URI, which monkeypatch takes back, else every later test's bdo reads this dead server
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        mlflow.set_tracking_uri(url)
        (sweep,) = experiment_runs(client, "tags.role = 'sweep'")
        assert sweep.info.status == "FINISHED"
        trials = experiment_runs(client, f"tags.mlflow.parentRunId = '{sweep.info.run_id}'")
        assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials), [t.info.status for t in trials]
        nodes = {t.data.tags.get("ray_node_id") for t in trials}
        assert nodes == {cluster.head, *cluster.workers}, (
            f"trials ran on {nodes}, cluster is {cluster.head} + {cluster.workers}"
        )
        for trial in trials:  # one attempt each, on the node it ran on
            tags = trial.data.tags
            assert tags["attempt"] == "1" and tags["node"] == tags["attempt_1_node"] == tags["ray_node_id"], tags
            assert tags["node_ip"] == tags["attempt_1_node_ip"] == "127.0.0.1", tags

        artifacts_root = tmp_path / "mlflow" / "artifacts"
        for trial in trials:
            run_id = trial.info.run_id
            assert [m.step for m in client.get_metric_history(run_id, "val_acc")] == [1, 2]
            listed = {a.path for a in client.list_artifacts(run_id)}
            assert {"config.yaml", "model", "plots", "samples.png", "trigger.png"} <= listed, listed
            assert {a.path for a in client.list_artifacts(run_id, "model")} >= {"model/model.safetensors"}
            # uploaded through the server (mlflow-artifacts:/), the only way a trial on another host can store them
            stored = [p for p in artifacts_root.rglob("*") if run_id in p.parts and p.name == "model.safetensors"]
            assert len(stored) == 1 and stored[0].stat().st_size > 0, stored
            local = Path(client.download_artifacts(run_id, "model/model.safetensors", str(tmp_path / run_id)))
            assert local.read_bytes() == stored[0].read_bytes()

        tune_dirs = list((storage / "tune").iterdir())
        assert len(tune_dirs) == 1
        checkpointed = {p.parent.parent.name for p in tune_dirs[0].glob("*/checkpoint_*/state.pt")}
        assert len(checkpointed) == 2, f"both nodes' trials checkpoint into the shared storage: {checkpointed}"
        assert not (work / "mlflow.db").exists(), "nothing may fall back to a local store"


def test_local_sqlite_store_is_refused_on_a_multi_node_cluster(tmp_path):
    work = tmp_path / "driver"
    work.mkdir()
    with ray_cluster(tmp_path, head_cpus=1, worker_cpus=(1,)) as cluster:
        env = child_env(cluster.ray_tmp)
        done = run_bdo(
            [
                "tune",
                str(SPACES / "badnets.yaml"),
                "--quick",
                "--num-samples",
                "1",
                "--address",
                cluster.address,
                "--storage",
                str(tmp_path / "bdo_runs"),
            ],
            work,
            env,
        )
        # with a tracking server, the storage: a local folder the other node's trials would write elsewhere.
        # Refused once connected, before the tracking server is contacted (none listens on this port).
        from orchestrator.ui import free_port

        url = f"http://127.0.0.1:{free_port()}"
        storage_refused = run_bdo(
            [
                "tune",
                str(SPACES / "badnets.yaml"),
                "--quick",
                "--num-samples",
                "1",
                "--address",
                cluster.address,
                "--tracking-uri",
                url,
                "--storage",
                str(tmp_path / "bdo_runs"),
            ],
            work,
            env,
        )
    assert storage_refused.returncode == 2, explain(storage_refused)
    errors = [line for line in storage_refused.stderr.splitlines() if line.startswith("bdo:")]
    assert len(errors) == 1, explain(storage_refused)
    assert errors[0].startswith(f"bdo: error: --storage {tmp_path / 'bdo_runs'}: this Ray cluster has 2 nodes"), errors[
        0
    ]
    assert "--shared-storage" in errors[0] and "local filesystem" in errors[0], errors[0]
    assert "Traceback" not in storage_refused.stderr, explain(storage_refused)
    assert done.returncode == 2, explain(done)
    errors = [line for line in done.stderr.splitlines() if line.startswith("bdo:")]
    assert len(errors) == 1, explain(done)
    assert errors[0].startswith("bdo: error: --tracking-uri sqlite:///") and "2 nodes" in errors[0], errors[0]
    assert "Traceback" not in done.stderr, explain(done)
    assert not (work / "mlflow.db").exists() and not (tmp_path / "bdo_runs").exists(), (
        "refused before creating anything"
    )


def test_attack_builds_and_final_runs_train_on_a_worker_not_the_driver(tmp_path, mlflow_template):
    """cluster.yaml's head is a CPU-only instance and the GPUs are on the workers: a sweep's attack build and a
    study's builds and final runs must be Ray tasks placed like trials, not trained by the driver on the head.
    Here the head offers no CPU to Ray, so a run that trains anywhere but in the driver lands on the worker, and
    the run records the node it trained on (a run the driver trained records none)."""
    from mlflow.tracking import MlflowClient

    storage = tmp_path / "shared" / "bdo_runs"
    work = tmp_path / "driver"
    work.mkdir()
    study = tmp_path / "study.yaml"
    study.write_text(
        "name: placed\ndataset: digits\nmodel: small_cnn\nattacks: [badnets]\ndefenses: [ft]\n"
        "seeds: [1]\nquick: true\ntune: {num_samples: 1, searcher: random, scheduler: fifo, seed: 0}\n"
    )
    with (
        mlflow_server(tmp_path / "mlflow", mlflow_template) as server,
        ray_cluster(tmp_path, head_cpus=0, worker_cpus=(1,)) as cluster,
    ):
        url = server.ready()
        env = child_env(cluster.ray_tmp)
        shared = ["--address", cluster.address, "--tracking-uri", url, "--storage", str(storage), "--shared-storage"]
        swept = run_bdo(
            ["tune", str(SPACES / "ft.yaml"), "--quick", "--num-samples", "1", "--cpus-per-trial", "1", *shared],
            work,
            env,
        )
        assert swept.returncode == 0, explain(swept)
        assert "in a Ray task (1 CPU)" in swept.stdout, explain(swept)
        studied = run_bdo(["study", str(study), "--cpus-per-trial", "1", *shared], work, env, timeout=600)
        assert studied.returncode == 0, explain(studied)

        client = MlflowClient(url)
        placed = {
            "attack": experiment_runs(client, "tags.role = 'attack'"),
            "trial": experiment_runs(client, "tags.role = 'trial'"),
            "final": experiment_runs(client, "tags.role = 'final'"),
        }
    # the sweep's attack (tuning seed) and the study's no-defense column (seed 1) are two builds
    assert len(placed["attack"]) == 2 and placed["trial"] and len(placed["final"]) == 1, {
        role: len(runs) for role, runs in placed.items()
    }
    for role, runs in placed.items():
        for run in runs:
            assert run.info.status == "FINISHED", (role, run.info.status)
            assert run.data.tags.get("ray_node_id") == cluster.workers[0], (
                f"{role} run {run.info.run_id} trained on {run.data.tags.get('ray_node_id')!r}, "
                f"not on the worker {cluster.workers[0]}"
            )
