"""Where runs go and the Ray they run on: the tracking store, experiment, storage and data of a command
(`Session`), starting or joining Ray, and the checks made against the cluster before anything trains."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.devices import ClusterShape
from orchestrator.errors import BadInput
from orchestrator.signals import kept_handlers, local_ray_in_its_own_session
from orchestrator.spaces import SweepPlan
from orchestrator.tracking import Tracker, is_local_store


@dataclass
class Session:
    """Where runs go: tracking store, experiment, storage, data, Ray address."""

    tracking_uri: str
    experiment: str
    storage: Path
    data_root: Path
    download: bool = False
    address: str | None = None
    verbose: bool = False  # Ray's, Tune's and the trials' own output; off: one line per trial (SweepProgress)
    # the user says --storage is on a filesystem every node mounts (--shared-storage, BDO_SHARED_STORAGE=1)
    shared_storage: bool = False
    tracker: Tracker | None = None
    _started_ray: bool = False

    def open_tracker(self) -> Tracker:
        if self.tracker is None:
            self.tracker = Tracker(self.tracking_uri, self.experiment)
        return self.tracker

    def start_ray(self, num_cpus: float | None = None) -> None:
        import ray

        os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
        if not ray.is_initialized():
            env = {"RAY_CHDIR_TO_TRIAL_DIR": "0", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
            for key in ("BDO_DATA_ROOT", "MLFLOW_TRACKING_URI"):
                if key in os.environ:
                    env[key] = os.environ[key]
            env = without_job_env_vars(env, job_env_vars())
            if not self.verbose:
                quiet_libraries()
            kwargs: dict[str, Any] = {
                "runtime_env": {"env_vars": env},
                "log_to_driver": self.verbose,
                "logging_level": logging.INFO if self.verbose else logging.WARNING,
            }
            with kept_handlers():  # bdo's stop signals end runs KILLED; stop_ray still shuts a local Ray down
                if self.address:
                    ray.init(address=self.address, **kwargs)
                else:
                    # Ray starts its workers, so every trial, at niceness 15 to keep its own daemons responsive;
                    # beside other work at the default priority a trial then got ~1/28 of a shared core (a quick
                    # epoch: 0.6 s plain, 37-42 s in a trial, benchmarks/RESULTS.md). On the user's own machine
                    # the trials are the user's work, so a local Ray runs them at 0 unless the user says otherwise.
                    with local_ray_in_its_own_session(), environment_default("RAY_worker_niceness", "0"):
                        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
            self._started_ray = True
        alive = [n for n in ray.nodes() if n.get("Alive")]
        if len(alive) > 1 and is_local_store(self.tracking_uri):
            self.stop_ray()
            raise BadInput(
                f"--tracking-uri {self.tracking_uri}: this Ray cluster has {len(alive)} nodes and other "
                "nodes cannot write a local sqlite file; point --tracking-uri (or MLFLOW_TRACKING_URI) "
                "at the head node's MLflow server, e.g. http://<head-ip>:5000"
            )
        if len(alive) > 1 and not self.shared_storage and (fs := local_filesystem(self.storage)) is not None:
            self.stop_ray()
            raise BadInput(
                f"--storage {self.storage}: this Ray cluster has {len(alive)} nodes and {fs}, which other "
                "nodes cannot see (their trials' checkpoints and the attack cache would never reach this "
                "driver); put --storage (or BDO_STORAGE) on a filesystem every node mounts (NFS, EFS, "
                "Lustre), or pass --shared-storage (BDO_SHARED_STORAGE=1) if it already is one"
            )

    def largest_node(self) -> str:
        """The node a trial's resources are checked against, in words (check_resources)."""
        return (
            f"the largest node of the Ray cluster at {self.address}"
            if self.address
            else "this machine (a local Ray's only node)"
        )

    def stop_ray(self) -> None:
        import ray

        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        self._started_ray = False


# filesystem types that other machines can mount too: a storage path on one of them is taken as shared
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "lustre",
        "gpfs",
        "ceph",
        "glusterfs",
        "beegfs",
        "orangefs",
        "pvfs2",
        "ocfs2",
        "gfs2",
        "afs",
        "9p",
        "virtiofs",
        "panfs",
        "wekafs",
        "fuse.glusterfs",
        "fuse.cephfs",
        "fuse.s3fs",
        "fuse.gcsfuse",
        "fuse.mount-s3",
        "fuse.juicefs",
        "fuse.sshfs",
        "fuse.rclone",
        "fuse.lustre",
        "fuse.beegfs",
    }
)


@contextlib.contextmanager
def environment_default(name: str, value: str) -> Iterator[None]:
    """`name` set to `value` inside the block unless the environment already sets it, as before afterwards."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def mount_of(path: Path, mounts: str) -> tuple[str, str] | None:
    """(mount point, filesystem type) of the mount that holds `path`, from the text of /proc/mounts: the entry
    with the longest mount point above it (the last one, where a later mount hides an earlier one)."""
    best: tuple[str, str] | None = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")  # /proc/mounts escapes a space in a mount point as \040
        if path == Path(point) or Path(point) in path.parents:
            if best is None or len(point) >= len(best[0]):
                best = (point, fields[2])
    return best


def local_filesystem(storage: Path, mounts: str | None = None) -> str | None:
    """Why `storage` is on this machine only, in words (its mount and filesystem type), or None when it is on a
    network filesystem (NETWORK_FILESYSTEMS), or when the mount table cannot be read (nothing to go on)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    found = mount_of(storage, mounts)
    if found is None:
        return None
    point, fstype = found
    if fstype in NETWORK_FILESYSTEMS:
        return None
    return f"it is on {point} ({fstype}), a local filesystem"


def cpus_named(plan: SweepPlan) -> str:
    """How the user asked for the plan's CPUs per trial: the flag, or the space's resources block."""
    if plan.space.resources.get("cpus_per_trial") == plan.cpus_per_trial:
        return f"{plan.space.path}: resources.cpus_per_trial {plan.cpus_per_trial:g}"
    return f"--cpus-per-trial {plan.cpus_per_trial:g}"


def check_resources(plans: list[SweepPlan], shape: ClusterShape, where: str) -> None:
    """A trial asks Ray for its CPUs (and GPUs) on one node (a DDP trial: its share per worker): more than the
    largest node has, and Tune waits for them for ever, after the attack was built. Refused up front instead.
    `where`: the largest node, in words (Session.largest_node)."""
    from orchestrator.devices import check_gpu_request

    most = max(shape.node_cpus, default=0.0)
    for plan in plans:
        check_gpu_request(plan.gpus_per_trial, list(shape.node_gpus))
        workers = max(plan.workers_per_trial, 1)
        need = plan.cpus_per_trial / workers
        if need > most:
            per = f" over --workers-per-trial {workers} ({need:g} per worker)" if workers > 1 else ""
            raise BadInput(
                f"{cpus_named(plan)}{per}: {where} has {most:g} CPUs, and Ray would wait for ever for "
                f"more; ask for at most {most:g} per {'worker' if workers > 1 else 'trial'}"
            )


def job_env_vars() -> dict[str, str]:
    """The env vars of the Ray job this driver runs as (`ray job submit --runtime-env-json`), which Ray hands the
    entrypoint in RAY_JOB_CONFIG_JSON_ENV_VAR and merges with ray.init's runtime env; none outside a job."""
    config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not config:
        return {}
    return (json.loads(config).get("runtime_env") or {}).get("env_vars") or {}


def without_job_env_vars(wanted: dict[str, str], job: dict[str, str]) -> dict[str, str]:
    """The env vars bdo may add to ray.init's runtime env inside a job. Ray refuses to merge a job's runtime env
    with one that sets any of the same variables, even to the same value; and the job's value is the one its
    processes, this driver included, already see, so it stays the value for the trials too."""
    return {key: value for key, value in wanted.items() if key not in job}


def quiet_libraries() -> None:
    """What a person running bdo does not need to read unless they ask with --verbose: Tune's experiment banner
    and TensorBoard hint (printed whatever the verbosity by Tune's newer output engine, so the older one, which
    is silent at verbose 0, is chosen), its per-sweep 'wrote the result files' line, Ray's note that the local
    instance uses token auth, and MLflow's lines while it creates a store."""
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    for name in ("ray.tune", "ray._private.authentication.authentication_token_setup", "ray._private.worker"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)


# the longest a sweep's output goes without a line (SweepProgress's summary), in seconds; BDO_PROGRESS_INTERVAL
# sets it. Tune is silent while trials train between reports, and a Ray job's log should show the sweep alive.
