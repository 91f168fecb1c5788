"""Running on a multi-node Ray cluster: run storage every node must see, the attempts of a retried trial on its
MLflow run, and a progress line in the driver's (job's) log at least every interval."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator import console
from orchestrator import session as session_module
from orchestrator.errors import BadInput
from orchestrator.trial import attempt_tags

MOUNTS = """\
/dev/nvme0n1p1 / ext4 rw,relatime 0 0
tmpfs /tmp tmpfs rw,nosuid,nodev 0 0
fs-0123.efs.us-west-2.amazonaws.com:/ /shared nfs4 rw,relatime,vers=4.1 0 0
/dev/nvme1n1 /shared/scratch xfs rw 0 0
server:/export /mnt/my\\040lab nfs rw 0 0
"""


# --- storage other nodes cannot see -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, local",
    [
        ("/home/me/bdo_runs", "/ (ext4)"),
        ("/tmp/x", "/tmp (tmpfs)"),
        ("/shared", None),
        ("/shared/bdo_runs", None),
        ("/shared/scratch/runs", "/shared/scratch (xfs)"),
        ("/mnt/my lab/runs", None),
        ("/sharedx", "/ (ext4)"),
    ],
)
def test_local_filesystem_reads_the_mount_that_holds_the_path(path, local):
    found = session_module.local_filesystem(Path(path), MOUNTS)
    if local is None:
        assert found is None
    else:
        assert found is not None and local in found


def test_an_unreadable_mount_table_refuses_nothing():
    assert session_module.local_filesystem(Path("/anywhere"), "") is None


def _session(
    monkeypatch, tmp_path, nodes: int, shared: bool = False, mounts: str = MOUNTS, storage: str = "/home/me/bdo_runs"
):
    ray = pytest.importorskip("ray")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}] * nodes + [{"Alive": False}])
    monkeypatch.setattr(
        session_module,
        "local_filesystem",
        lambda path, table=None, real=session_module.local_filesystem: real(path, mounts),
    )
    return session_module.Session(
        "http://10.0.0.2:5000", "bdo", Path(storage), tmp_path, address="auto", verbose=True, shared_storage=shared
    )


def test_local_storage_is_refused_on_a_multi_node_cluster(monkeypatch, tmp_path):
    session = _session(monkeypatch, tmp_path, nodes=2)
    with pytest.raises(BadInput) as caught:
        session.start_ray()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("--storage /home/me/bdo_runs: this Ray cluster has 2 nodes")
    assert "/ (ext4)" in message and "--shared-storage" in message and "BDO_SHARED_STORAGE=1" in message
    assert not session._started_ray, "Ray is shut down again"


@pytest.mark.parametrize(
    "nodes, shared, storage",
    [
        (1, False, "/home/me/bdo_runs"),  # one node: every trial runs where the driver is
        (2, True, "/home/me/bdo_runs"),  # the user says it is shared
        (3, False, "/shared/bdo_runs"),  # on NFS
    ],
)
def test_storage_every_node_sees_is_accepted(monkeypatch, tmp_path, nodes, shared, storage):
    _session(monkeypatch, tmp_path, nodes=nodes, shared=shared, storage=storage).start_ray()


@pytest.mark.parametrize("value, shared", [("1", True), ("true", True), ("", False), ("0", False)])
def test_shared_storage_flag_defaults_to_the_env_var(monkeypatch, value, shared):
    from orchestrator.cli import build_parser

    monkeypatch.setenv("BDO_SHARED_STORAGE", value)
    parser = build_parser()
    assert parser.parse_args(["tune", "x.yaml"]).shared_storage is shared
    assert parser.parse_args(["tune", "x.yaml", "--shared-storage"]).shared_storage is True


# --- a retried trial's attempts -------------------------------------------------------------------------------------


def test_attempts_count_up_and_keep_each_node():
    first = attempt_tags({}, "node-a", "10.0.0.11")
    assert first == {
        "attempt": "1",
        "node": "node-a",
        "node_ip": "10.0.0.11",
        "ray_node_id": "node-a",
        "attempt_1_node": "node-a",
        "attempt_1_node_ip": "10.0.0.11",
    }
    second = attempt_tags({"trial_id": "t_00000", **first}, "node-b", "10.0.0.12")
    assert second["attempt"] == "2" and second["node"] == "node-b" and second["node_ip"] == "10.0.0.12"
    assert second["attempt_2_node"] == "node-b" and "attempt_1_node" not in second, "earlier attempts stay as set"
    assert attempt_tags({"trial_id": "t", **first, **second}, "node-a", "10.0.0.11")["attempt"] == "3"


def test_a_run_from_before_attempts_were_counted_is_on_its_second():
    assert attempt_tags({"trial_id": "t_00000", "ray_node_id": "node-a"}, "node-b", "x")["attempt"] == "2"


# --- a progress line at least every interval ------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _trial(status: str, value=None, trial_id: str = "t"):
    return SimpleNamespace(status=status, trial_id=trial_id, last_result={} if value is None else {"val_x": value})


@pytest.mark.parametrize(
    "value, expected", [("7", 7.0), ("0.5", 0.5), ("", 60.0), ("0", 60.0), ("soon", 60.0), ("nan", 60.0)]
)
def test_progress_interval_comes_from_the_env(monkeypatch, value, expected):
    monkeypatch.setenv("BDO_PROGRESS_INTERVAL", value)
    assert console.progress_interval() == expected


def test_a_summary_line_when_nothing_was_printed_for_an_interval(capsys):
    pytest.importorskip("ray")
    clock = Clock()
    progress = console.SweepProgress("sd", "val_x", "max", 4, interval=60, clock=clock)
    progress.tty = False
    trials = [
        _trial("RUNNING", 0.4),
        _trial("RUNNING"),
        _trial("PENDING"),
        _trial("TERMINATED", 0.7),
        _trial("ERROR", 0.9),
    ]
    clock.now += 59
    progress.on_step_end(iteration=1, trials=trials)
    assert capsys.readouterr().out == "", "not before the interval"
    clock.now += 2
    progress.on_step_end(iteration=2, trials=trials)
    assert capsys.readouterr().out == (
        "sd: progress  running 2  pending 1  finished 1/4  errored 1  best val_x 0.700  elapsed 0:01:01\n"
    )
    clock.now += 30
    progress.on_step_end(iteration=3, trials=trials)
    assert capsys.readouterr().out == ""
    progress.on_trial_complete(iteration=4, trials=trials, trial=_trial("TERMINATED", 0.8, "t_1"))
    assert "trial 1/4 t_1 done" in capsys.readouterr().out
    clock.now += 59  # a trial's line counts as the sweep's output: the next summary is an interval after it
    progress.on_step_end(iteration=5, trials=trials)
    assert capsys.readouterr().out == ""
    clock.now += 3601
    progress.on_step_end(iteration=6, trials=[])
    assert capsys.readouterr().out == (
        "sd: progress  running 0  pending 0  finished 0/4  errored 0  best val_x 0.800  elapsed 1:02:31\n"
    )


# --- where attack builds and final runs train ---------------------------------------------------------------------


@dataclass(frozen=True)
class PlanShape:
    """What placement() reads of a SweepPlan (resolve_gpus replaces gpus_per_trial on a copy)."""

    gpus_per_trial: float | None
    cpus_per_trial: float = 2.0
    max_concurrent: int | None = None
    num_samples: int = 4
    workers_per_trial: int = 1


@pytest.mark.parametrize(
    "node_gpus, node_cpus, driver_gpus, gpus_per_trial, expected",
    [
        ((0.0,), (2.0,), 0, None, (False, "cpu", 0.0)),  # one CPU machine: the driver, as before
        ((1.0,), (8.0,), 1, None, (False, "cuda", 0.0)),  # one GPU machine: the driver holds the GPU
        ((0.0, 0.0), (4.0, 4.0), 0, None, (True, "cpu", 0.0)),  # a CPU cluster: a task with a trial's CPUs
        # CPU-only head, a GPU worker: the task takes a trial's automatic share (4 trials on one GPU)
        ((0.0, 1.0), (4.0, 8.0), 0, None, (True, "cuda", 0.25)),
        ((0.0, 1.0), (4.0, 8.0), 0, 0.0, (True, "cpu", 0.0)),  # CPU trials forced: a CPU task, still not the driver
        ((1.0,), (8.0,), 0, 0.5, (True, "cuda", 0.5)),  # one remote GPU node (--address) the driver cannot see
    ],
)
def test_runs_train_where_the_trials_train(monkeypatch, node_gpus, node_cpus, driver_gpus, gpus_per_trial, expected):
    import ray

    from methods.core import hardware
    from orchestrator import devices, placement
    from orchestrator.devices import ClusterShape

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ClusterShape, "from_ray", staticmethod(lambda: ClusterShape(node_gpus, node_cpus)))
    monkeypatch.setattr(hardware, "visible_gpu_count", lambda: driver_gpus)
    monkeypatch.setattr(devices, "default_device_name", lambda: "cuda" if driver_gpus else "cpu")
    plan = PlanShape(gpus_per_trial=gpus_per_trial)
    where = placement.placement(plan)
    assert (where.in_task, where.device, where.gpus if where.in_task else 0.0) == expected
    if where.in_task:
        assert where.cpus == 2.0
