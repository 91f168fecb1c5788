"""MLflow: the store, the experiment, the run tree, batched metrics, params, tags and artifacts.

The store and the experiment are created once on the driver before any trial starts (concurrent first-time
schema creation on sqlite fails); trials then open runs in the existing experiment. Default store: MLflow's own
default, sqlite:///mlflow.db in the working directory, made absolute so trials (whose working directory Ray may
change) write to the same file.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

from orchestrator.errors import BadInput

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_URI = "sqlite:///mlflow.db"
SECRET_HINTS = ("token", "password", "secret", "api_key", "apikey", "credential")


def resolve_tracking_uri(uri: str | None) -> str:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str((Path.cwd() / uri[len("sqlite:///"):]).resolve())
    if "://" not in uri:  # a bare path means a sqlite file
        return "sqlite:///" + str(Path(uri).expanduser().resolve())
    return uri


def is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:")


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, str]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"git_commit": commit, "git_dirty": str(dirty).lower()}


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


def scrub(params: dict[str, Any]) -> dict[str, Any]:
    """Never log a secret: values under keys that look like credentials are dropped."""
    return {k: v for k, v in params.items() if not any(h in k.lower() for h in SECRET_HINTS)}


class Tracker:
    """A thin, batched layer over MlflowClient used by the driver and by trials alike."""

    def __init__(self, uri: str, experiment: str | None = None, experiment_id: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = experiment_id
        if experiment_id is None and experiment is not None:
            self.experiment_id = self.ensure_experiment(experiment)

    def ensure_experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                raise BadInput(f"--experiment {name!r} was deleted in MLflow; restore it or choose another name")
            return found.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):
            location = (Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts" / name).resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:  # created concurrently by another driver
            return self.client.get_experiment_by_name(name).experiment_id

    def start_run(self, name: str, tags: dict[str, str], parent_id: str | None = None) -> str:
        all_tags = {**code_version(), **package_versions(), **{k: str(v) for k, v in tags.items()}}
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)[:6000]) for k, v in sorted(scrub(params).items())]
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

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status

    def children(self, parent_id: str, extra_filter: str = "") -> list:
        query = f"tags.mlflow.parentRunId = '{parent_id}'" + (f" and {extra_filter}" if extra_filter else "")
        return self.search(query)

    def search(self, query: str, order_by: Iterable[str] = ("attributes.start_time DESC",)) -> list:
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1000,
                                           order_by=list(order_by), page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs
