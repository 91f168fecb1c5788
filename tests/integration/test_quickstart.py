"""`bdo quickstart --quick`, the command `make demo` and the README start with, on a real local Ray and sqlite
MLflow store: it exits 0, prints one table row per defense, and leaves the attack and one sweep per defense."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from methods.core.method import method_names
from orchestrator.cli import main
from tests.integration.conftest import runs

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_quickstart_quick(ray_session, workdir, capsys):
    # what the quickstart promises: every registered defense that has a search space, nothing else
    defenses = sorted(n for n in method_names("defense") if (SPACES / f"{n}.yaml").is_file())
    assert {"ft", "dbr", "asd"} <= set(defenses), defenses

    started = time.perf_counter()
    code = main(["quickstart", "--quick"])
    elapsed = time.perf_counter() - started
    out, err = capsys.readouterr()
    print(f"quickstart --quick: {elapsed:.0f}s for {len(defenses)} defenses")
    assert code == 0, err[-3000:]

    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["defense"])
    assert lines[header].split() == ["defense", "val_acc", "val_asr", "test_acc", "test_asr", "test_der"]
    rows = {}
    for line in lines[header + 2 :]:
        if not line.strip():
            break
        name, *values = line.split()
        rows[name] = [float(v) for v in values]
    assert sorted(rows) == defenses, rows
    for name, values in rows.items():
        # the row is the selected trial's: an empty selection prints nan
        assert len(values) == 5 and all(math.isfinite(v) for v in values[:4]), (name, values)
    assert "selected on validation metrics" in out and "bdo ui --tracking-uri sqlite:///" in out
    # readable: a line per defense and per trial, then the table; Tune's banners and hints only with --verbose
    assert len(lines) < 60, f"{len(lines)} lines:\n{out}"
    assert not any(noise in out for noise in ("Configuration for experiment", "TensorBoard", "Trial status"))
    assert header >= len(lines) - len(defenses) - 6, "the table ends the output"

    client, all_runs = runs(workdir)
    attacks = {r.info.run_id: r for r in all_runs if r.data.tags.get("role") == "attack"}
    assert attacks and {r.data.tags["method"] for r in attacks.values()} == {"badnets"}
    assert all(r.info.status == "FINISHED" for r in attacks.values())
    sweeps = [r for r in all_runs if r.data.tags.get("role") == "sweep"]
    assert sorted(s.data.tags["method"] for s in sweeps) == defenses, "one sweep per defense"
    for sweep in sweeps:
        tags = sweep.data.tags
        assert tags["quickstart"] == "true" and tags["dataset"] == "digits" and tags["attack"] == "badnets"
        assert tags["attack_run_id"] in attacks, f"{tags['method']}: built on an attack run the store lacks"
        assert sweep.info.status == "FINISHED", tags["method"]
        trials = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == sweep.info.run_id]
        assert len(trials) == 1 and trials[0].info.status == "FINISHED", (tags["method"], len(trials))
        assert tags.get("best_run_id") == trials[0].info.run_id, tags["method"]
