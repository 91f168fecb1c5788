"""MLflow: the store, the experiment, the run tree, batched metrics, params, tags and artifacts.

The store and the experiment are created once on the driver before any trial starts (concurrent first-time
schema creation on sqlite fails); trials then open runs in the existing experiment. Default store: MLflow's own
default, sqlite:///mlflow.db in the working directory, made absolute so trials (whose working directory Ray may
change) write to the same file.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import BadInput

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_URI = "sqlite:///mlflow.db"
# MLflow 3's UI opens an experiment in the mode this tag names; without it a new experiment lands on the GenAI
# overview (traces, token usage), not on the runs table where bdo's runs are.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
SYSTEM_METRICS_INTERVAL_S = 5.0
SECRET_HINTS = ("token", "password", "secret", "api_key", "apikey", "credential")


def resolve_tracking_uri(uri: str | None) -> str:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str((Path.cwd() / sqlite_path(uri)).resolve())
    if "://" not in uri:  # a bare path means a sqlite file
        return "sqlite:///" + str(Path(uri).expanduser().resolve())
    return uri


def is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (as resolve_tracking_uri writes it); None for any other store."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def sqlite_damage(db: Path) -> str | None:
    """What SQLite says is wrong with an existing database file (not a database, truncated, malformed), or None
    when it reads. Read-only, through SQLite's own locking, so a store another process is writing is never taken
    for a damaged one; a store that is merely busy or locked counts as readable."""
    import sqlite3

    if db.stat().st_size == 0:  # SQLite's empty database: MLflow creates its tables in it
        return None
    try:
        connection = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    except sqlite3.OperationalError:
        return None  # cannot be opened read-only here (permissions): not evidence of damage
    try:
        # a read transaction: SQLite checks the header, the page count against the file's size and the schema
        connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.OperationalError:
        return None  # busy, locked: another process is writing it
    except sqlite3.DatabaseError as exc:  # "file is not a database", "database disk image is malformed"
        return str(exc)
    finally:
        connection.close()
    return None


def damaged_store(uri: str, db: Path, problem: str) -> BadInput:
    return BadInput(
        f"--tracking-uri {uri}: {db} is not a readable SQLite database ({problem}); bdo never deletes "
        f"a store: move it aside (mv {db} {db}.damaged) to start a new one there, or pass the "
        "--tracking-uri of another store"
    )


def open_client(uri: str):
    """An MlflowClient on the store. The first use of a sqlite store creates MLflow's tables (a dozen migrations,
    seconds); two processes doing that at once break each other's migrations (`No such constraint`,
    `_alembic_tmp_* already exists`). So while the file is new, its creation is serialised with the attack cache's
    lock (orchestrator.cache.ExclusiveLock) in <db>.lock beside it: the second process waits, then opens the
    created store. The lock is taken before SQLite creates the file, so a process that finds the file but no
    lock finds it complete."""
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    lock_path = db.with_name(f"{db.name}.lock") if db is not None else None
    fresh = db is not None and (not db.exists() or db.stat().st_size == 0 or lock_path.exists())
    try:
        if not fresh:
            return MlflowClient(tracking_uri=uri)
        import sys

        from orchestrator.cache import ExclusiveLock

        def waiting(_: str) -> None:
            print(f"waiting for {lock.holder()} to create the MLflow store {db}", file=sys.stderr, flush=True)

        lock = ExclusiveLock(lock_path, poll=0.2, on_wait=waiting)
        with lock:
            return MlflowClient(tracking_uri=uri)
    except Exception:
        problem = db is not None and db.is_file() and sqlite_damage(db)
        if problem:
            raise damaged_store(uri, db, problem) from None
        raise


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, str]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD")
    if not commit:
        # no checkout here, e.g. a Ray job's working dir (Ray leaves .git out): the submitter may name the commit in
        # BDO_GIT_COMMIT, but whether the uploaded files match it cannot be told (source_sha256 still shows edits)
        return {
            "git_commit": os.environ.get("BDO_GIT_COMMIT") or "unknown",
            "git_dirty": "unknown",
            "source_sha256": source_digest(),
        }
    # untracked files count: a new methods/defenses/mydefense.py is exactly how a method is added
    dirty = bool(git("status", "--porcelain", "--untracked-files=normal", "--", *SOURCE_DIRS, "search_spaces"))
    return {"git_commit": commit, "git_dirty": str(dirty).lower(), "source_sha256": source_digest()}


SOURCE_DIRS = ("methods", "orchestrator")


def source_digest() -> str:
    """A hash of the Python sources a run executes (methods/ and orchestrator/), so two runs with the same
    commit but different uncommitted edits, or none at all in a copy without git, can be told apart."""
    import hashlib

    h = hashlib.sha256()
    for folder in SOURCE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            h.update(str(path.relative_to(ROOT)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "torchvision", "ray", "mlflow", "numpy", "bdo"):
        try:
            out[f"version.{name}"] = version(name)
        except PackageNotFoundError:
            out[f"version.{name}"] = "missing"
    return out


def system_metrics_interval() -> float:
    """Seconds between MLflow system-metrics samples of a run (CPU, memory, disk, network, GPU where present);
    0 turns them off. BDO_SYSTEM_METRICS=0 switches them off (the test suite does, for speed)."""
    raw = os.environ.get("BDO_SYSTEM_METRICS", "").strip().lower()
    if raw in ("0", "off", "false", "no"):
        return 0.0
    try:
        return float(raw) if raw not in ("", "1", "on", "true", "yes") else SYSTEM_METRICS_INTERVAL_S
    except ValueError:
        raise BadInput(
            f"BDO_SYSTEM_METRICS={raw!r}: 0 (off), 1 (on, every {SYSTEM_METRICS_INTERVAL_S:g} s) or "
            "a sampling interval in seconds"
        ) from None


@dataclass(frozen=True)
class DatasetRecord:
    """One data split a run used, as MLflow shows it in the runs table's Dataset column."""

    name: str
    digest: str
    context: str  # training, validation or test
    source: dict[str, Any]
    profile: dict[str, Any]


@functools.lru_cache(maxsize=1)
def model_requirements() -> list[str]:
    """What loading a logged model needs, pinned to the versions installed here (uv installs the lockfile's)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("torch", "torchvision", "numpy"):  # and bdo's methods package, which PyPI does not serve
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return out


def scrub(params: dict[str, Any]) -> dict[str, Any]:
    """Never log a secret: values under keys that look like credentials are dropped."""
    return {k: v for k, v in params.items() if not any(h in k.lower() for h in SECRET_HINTS)}


@dataclass
class RunEnd:
    """How a run that ends without an exception ends (Tracker.ending)."""

    status: str = "FINISHED"


class Tracker:
    """A thin, batched layer over MlflowClient used by the driver and by trials alike."""

    def __init__(self, uri: str, experiment: str | None = None, experiment_id: str | None = None) -> None:
        import mlflow

        self.uri = uri
        self.client = open_client(uri)
        # A run's "model" is both a folder of its artifacts and a logged model; MLflow resolves the logged model
        # through the process-wide tracking URI, not the client's, so reading runs:/ID/model from another store
        # than the global one fails (or opens ./mlflow.db). So MLflow's global URI follows the store in use; but
        # set_tracking_uri also exports MLFLOW_TRACKING_URI, which bdo reads as the user's default store, so the
        # variable is put back as the user left it (else every later command in this process would use this store).
        previous = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri)
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
        self.experiment_id = experiment_id
        if experiment_id is None and experiment is not None:
            self.experiment_id = self.ensure_experiment(experiment)

    def ensure_experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                raise BadInput(f"--experiment {name!r} was deleted in MLflow; restore it or choose another name")
            for key, value in EXPERIMENT_TAGS.items():  # stores written before the tag existed
                if found.tags.get(key) != value:
                    self.client.set_experiment_tag(found.experiment_id, key, value)
            return found.experiment_id
        location = None
        if (db := sqlite_path(self.uri)) is not None:
            location = (db.parent / "mlartifacts" / name).resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
        except Exception:  # created concurrently by another driver
            return self.client.get_experiment_by_name(name).experiment_id

    def start_run(self, name: str, tags: dict[str, str], parent_id: str | None = None) -> str:
        # mlflow.source.* fill the runs table's Source column
        source = {
            "mlflow.source.type": "LOCAL",
            "mlflow.source.name": "bdo",
            "mlflow.source.git.commit": code_version()["git_commit"],
        }
        all_tags = {**source, **code_version(), **package_versions(), **{k: str(v) for k, v in tags.items()}}
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [
            Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)[:6000])
            for k, v in sorted(scrub(params).items())
        ]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if isinstance(v, (int, float))]
        if items:
            self.client.log_batch(run_id, metrics=items)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        if Path(path).is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_datasets(self, run_id: str, records: list[DatasetRecord]) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [
            DatasetInput(
                Dataset(
                    r.name,
                    r.digest,
                    "bdo",
                    json.dumps(r.source, sort_keys=True),
                    profile=json.dumps(r.profile, sort_keys=True),
                ),
                [InputTag("mlflow.data.context", r.context)],
            )
            for r in records
        ]
        # MLflow's SQL store looks a dataset up and inserts it when missing, in one transaction; two runs logging
        # the same new dataset at once (a study's concurrent trials) both miss it and the second insert breaks the
        # unique key. The failed transaction is rolled back whole, and a second try finds the other run's row.
        for attempt in range(3):
            try:
                self.client.log_inputs(run_id, datasets=inputs)
                return
            except Exception as error:
                message = str(error).lower()  # sqlite: "UNIQUE constraint failed", postgres: "unique constraint"
                if attempt == 2 or "unique constraint" not in message or "dataset" not in message:
                    raise
                time.sleep(0.05 * (attempt + 1))

    def log_pytorch_model(self, run_id: str, model: Any, example: Any, step: int = 0) -> str:
        """The run's final weights as an MLflow model named "model" (PyTorch flavour, pickle format, with a
        signature and an input example), so `mlflow.pytorch.load_model(f"runs:/{run_id}/model")` works and the
        runs table and the Models view list it. Loading it unpickles the model object, which imports bdo's
        `methods.models` classes and would run whatever a tampered pickle holds: load only from stores you trust.
        bdo itself never loads these; the attack cache and every check read the safetensors file under model/."""
        import logging
        import tempfile

        import mlflow.pytorch
        import torch
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus
        from mlflow.models import infer_signature

        with torch.no_grad():
            logits = model(torch.from_numpy(example)).numpy()
        logged = self.client.create_logged_model(
            self.experiment_id, name="model", source_run_id=run_id, tags={"flavor": "pytorch"}
        )
        # uv's environments have no pip, and MLflow warns on every model that it cannot pin pip's version; it also
        # warns on every pickled model, which this docstring and the README explain once
        for name in ("mlflow.utils.environment", "mlflow.pytorch"):
            logging.getLogger(name).setLevel(logging.ERROR)
        with tempfile.TemporaryDirectory(prefix="bdo-mlflow-model-") as tmp:
            local = Path(tmp) / "model"
            # pickle, not MLflow's default pt2: exporting a graph took ~3 s per run here against ~0.4 s
            mlflow.pytorch.save_model(
                model,
                str(local),
                signature=infer_signature(example, logits),
                input_example=example,
                pip_requirements=model_requirements(),
                serialization_format="pickle",
            )
            self.client.log_model_artifacts(logged.model_id, str(local))
        self.client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step)])
        self.client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        return logged.model_id

    def system_metrics(self, run_id: str, interval: float):
        """A context that samples MLflow's system metrics into the run while it is open (interval 0: nothing)."""
        import contextlib
        import logging

        if interval <= 0:
            return contextlib.nullcontext()
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # one INFO line per run otherwise
        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, tracking_uri=self.uri)

        @contextlib.contextmanager
        def sampling():
            monitor.start()
            try:
                yield monitor
            finally:
                monitor.finish()
                # MLflow's loop drops the samples of an unfinished interval, so a run shorter than one interval
                # would record none: publish what is left as the run's last point (one sample at least).
                remaining = monitor.aggregate_metrics() or (monitor.collect_metrics() and monitor.aggregate_metrics())
                if remaining:
                    monitor.publish_metrics(remaining)
                    monitor.mlflow_logger.flush()

        return sampling()

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    @contextlib.contextmanager
    def ending(self, run_id: str, leave: tuple[type[BaseException], ...] = ()) -> Iterator[RunEnd]:
        """Ends the run with the block: KILLED when it is interrupted (Ctrl-C, and under `bdo` every stop signal,
        raises KeyboardInterrupt: orchestrator.signals), FAILED on any other exception, else FINISHED or the
        status the block set on what this yields. Exceptions in `leave` end the block but not the run."""
        end = RunEnd()
        try:
            yield end
        except leave:
            raise
        except KeyboardInterrupt:
            self.end(run_id, "KILLED")
            raise
        except BaseException:
            self.end(run_id, "FAILED")
            raise
        self.end(run_id, end.status)

    def logged_through(self, run_id: str) -> int:
        """The last step any metric of the run was logged at; 0 for none."""
        run = self.client.get_run(run_id)
        return max((m.step for key in run.data.metrics for m in self.client.get_metric_history(run_id, key)), default=0)

    def has_run(self, run_id: str) -> bool:
        """Whether this store holds the run (ids from an attack cache shared with other stores may not be)."""
        if not run_id:
            return False
        try:
            self.client.get_run(run_id)
        except Exception:
            return False
        return True

    def status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status

    def children(self, parent_id: str, extra_filter: str = "") -> list:
        query = f"tags.mlflow.parentRunId = '{parent_id}'" + (f" and {extra_filter}" if extra_filter else "")
        return self.search(query)

    def search(self, query: str, order_by: Iterable[str] = ("attributes.start_time DESC",)) -> list:
        runs, token = [], None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], filter_string=query, max_results=1000, order_by=list(order_by), page_token=token
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs
