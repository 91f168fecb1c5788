"""One Ray instance and one pre-migrated MLflow store template for the whole test session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    import ray

    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    temp = tmp_path_factory.mktemp("ray")
    ray.init(
        num_cpus=4, include_dashboard=False, _temp_dir=str(temp), object_store_memory=200 * 1024**2, log_to_driver=False
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """Creating a fresh sqlite store runs the Alembic migrations (~7 s); do it once and copy per test."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def workdir(tmp_path, mlflow_template, monkeypatch) -> Path:
    """A fresh working directory with a migrated store at its default place (./mlflow.db)."""
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def runs(workdir: Path, experiment: str = "bdo", query: str = ""):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} was not created"
    return client, client.search_runs([exp.experiment_id], filter_string=query, max_results=1000)
