"""Every run names an attack run its own store holds, even when the attack came from a cache shared with other
stores."""

from __future__ import annotations

import shutil

import pytest

from orchestrator.cli import main
from tests.integration.conftest import runs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
DEFEND = ["defend", "ft", "--attack", "badnets", "--set", "attack.epochs=2", "--set", "epochs=1"]


def test_a_cached_attack_is_recorded_in_a_new_store(workdir, mlflow_template, tmp_path, monkeypatch):
    storage = tmp_path / "shared-storage"
    assert main([*DEFEND, "--storage", str(storage)]) == 0
    _, first = runs(workdir)
    built = next(r for r in first if r.data.tags["role"] == "attack")

    other = tmp_path / "other-store"
    other.mkdir()
    shutil.copy(mlflow_template, other / "mlflow.db")
    monkeypatch.chdir(other)
    assert main([*DEFEND, "--storage", str(storage)]) == 0
    client, second = runs(other)
    (attack,) = [r for r in second if r.data.tags["role"] == "attack"]
    (defense,) = [r for r in second if r.data.tags["role"] == "defense"]
    assert defense.data.tags["attack_run_id"] == attack.info.run_id, "the defense names a run of its own store"
    assert attack.data.tags["restored_from_cache"] == "true"
    assert attack.data.tags["cache_built_by_run"] == built.info.run_id
    assert attack.data.metrics["test_asr"] == pytest.approx(built.data.metrics["test_asr"])
    assert {"config.yaml", "model"} <= {a.path for a in client.list_artifacts(attack.info.run_id)}
    assert len(list((storage / "attacks").iterdir())) == 1, "served from the cache, not trained again"


def test_bdo_attack_fills_the_cache_that_defend_reuses(workdir, capsys):
    assert main(["attack", "badnets", "--set", "epochs=2"]) == 0
    assert main(["defend", "ft", "--attack", "badnets", "--set", "attack.epochs=2", "--set", "epochs=1"]) == 0
    assert main(["attack", "badnets", "--set", "epochs=2"]) == 0
    assert "the same attack is in the cache" in capsys.readouterr().out
    _, all_runs = runs(workdir)
    (attack,) = [r for r in all_runs if r.data.tags["role"] == "attack"]
    (defense,) = [r for r in all_runs if r.data.tags["role"] == "defense"]
    assert defense.data.tags["attack_run_id"] == attack.info.run_id, "defend reused the model bdo attack trained"


def test_attack_run_uses_exactly_that_runs_model_or_refuses(workdir, tmp_path, capsys):
    assert main(["attack", "badnets", "--set", "epochs=2"]) == 0
    _, all_runs = runs(workdir)
    (attack,) = [r for r in all_runs if r.data.tags["role"] == "attack"]
    assert main(["defend", "ft", "--attack-run", attack.info.run_id, "--set", "epochs=1"]) == 0
    _, all_runs = runs(workdir)
    (defense,) = [r for r in all_runs if r.data.tags["role"] == "defense"]
    assert defense.data.tags["attack_run_id"] == attack.info.run_id
    assert len([r for r in all_runs if r.data.tags["role"] == "attack"]) == 1, "nothing retrained"
    capsys.readouterr()
    # another storage has no such model: one line, exit 2, never a retrained attack under that id
    code = main(["defend", "ft", "--attack-run", attack.info.run_id, "--storage", str(tmp_path / "elsewhere")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "not in the attack cache" in err, err
    _, after = runs(workdir)
    assert len(after) == len(all_runs)
