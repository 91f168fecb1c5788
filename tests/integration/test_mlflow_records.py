"""What MLflow holds for a run, read back through MLflow's own APIs: the experiment opens as a model-training
experiment, the splits are dataset inputs, the final weights are an MLflow model that reproduces the run's
logged test ACC, and system metrics are sampled on single runs and on a sweep's trials."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from methods.attacks.base import Backdoor
from methods.core.metrics import accuracy
from methods.core.training import predict_logits
from orchestrator.cli import main
from tests.integration.conftest import runs

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_a_defense_run_records_datasets_a_loadable_model_and_system_metrics(workdir, monkeypatch):
    import mlflow.pytorch

    # An interval longer than the runs: each must still record the sample taken when it ends.
    monkeypatch.setenv("BDO_SYSTEM_METRICS", "600")
    assert main(["defend", "ft", "--attack", "badnets", "--set", "attack.epochs=3", "--set", "epochs=2"]) == 0
    client, all_runs = runs(workdir)
    experiment = client.get_experiment(all_runs[0].info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development", "the UI must open on the runs"
    defense = next(r for r in all_runs if r.data.tags["role"] == "defense")
    attack = next(r for r in all_runs if r.data.tags["role"] == "attack")
    for run in (attack, defense):
        inputs = {
            d.dataset.name: {t.key: t.value for t in d.tags}["mlflow.data.context"]
            for d in client.get_run(run.info.run_id).inputs.dataset_inputs
        }
        assert inputs == {"digits-train-badnets": "training", "digits-val": "validation", "digits-test": "test"}
        assert any(k.startswith("system/") for k in run.data.metrics), sorted(run.data.metrics)

    model = mlflow.pytorch.load_model(f"runs:/{defense.info.run_id}/model").eval()
    entry = next(p for p in (workdir / "bdo_runs" / "attacks").iterdir() if p.is_dir())
    data = Backdoor.load(entry).data
    with torch.no_grad():
        acc = accuracy(predict_logits(model, data.x_test).argmax(1), data.y_test)
    assert acc == pytest.approx(defense.data.metrics["test_acc"]), "the MLflow model is the run's final model"
    # the test split's blind signals, measured only for the returned model, are logged with its last report
    last_step = max(m.step for m in client.get_metric_history(defense.info.run_id, "test_acc"))
    for key in ("test_adv_concentration", "test_blind_score"):
        assert [m.step for m in client.get_metric_history(defense.info.run_id, key)] == [last_step], key
    (logged,) = client.search_logged_models(
        experiment_ids=[experiment.experiment_id], filter_string=f"source_run_id = '{defense.info.run_id}'"
    )
    assert logged.name == "model" and str(logged.status).endswith("READY")


def test_a_sweeps_trials_carry_system_metrics(ray_session, workdir, monkeypatch):
    monkeypatch.setenv("BDO_SYSTEM_METRICS", "0.5")
    assert main(["tune", str(SPACES / "badnets.yaml"), "--quick", "--num-samples", "1"]) == 0
    _, trials = runs(workdir, query="tags.role = 'trial'")
    assert trials and all(any(k.startswith("system/") for k in t.data.metrics) for t in trials)
