"""Sweeps on a real local Ray and a real sqlite MLflow store (attack spaces; defenses have their own tests)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from orchestrator.cli import main
from tests.integration.conftest import runs

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def metric_steps(client, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_two_worker_ddp_trial_trains_like_one_worker(ray_session, workdir, capsys):
    common = [
        "tune",
        str(SPACES / "badnets.yaml"),
        "--num-samples",
        "1",
        "--set",
        "poison_rate=0.1",
        "--set",
        "lr=0.05",
        "--set",
        "epochs=10",
        "--cpus-per-trial",
        "2",
    ]
    assert main(common + ["--workers-per-trial", "2"]) == 0
    assert main(common + ["--workers-per-trial", "1"]) == 0
    client, trials = runs(workdir, query="tags.role = 'trial'")
    by_world = {t.data.tags.get("ddp_world_size", "1"): t for t in trials}
    ddp, single = by_world["2"], by_world["1"]
    assert ddp.data.tags["ddp_weights_identical"] == "true", "both ranks must end with identical weights"
    assert metric_steps(client, ddp.info.run_id, "val_acc") == list(range(1, 11))
    assert ddp.info.status == "FINISHED"
    acc_ddp, acc_one = ddp.data.metrics["test_acc"], single.data.metrics["test_acc"]
    print(f"DDP test_acc {acc_ddp:.3f} vs one worker {acc_one:.3f}")
    assert acc_ddp > 0.9 and abs(acc_ddp - acc_one) < 0.04
    assert {"config.yaml", "model", "plots"} <= {a.path for a in client.list_artifacts(ddp.info.run_id)}


def test_asha_stops_poor_trials_early(ray_session, workdir, tmp_path):
    space = tmp_path / "asha.yaml"
    space.write_text(
        "method: badnets\n"
        "fixed: {poison_rate: 0.1, epochs: 6}\n"
        "space:\n  lr: {loguniform: [0.0005, 0.2]}\n"
        "objective: {metric: val_acc, mode: max}\n"
        "scheduler: {name: asha, grace_period: 1, max_t: 6, reduction_factor: 2}\n"
    )
    # val_acc is blind (methods/core/knowledge.py), so the sweep may run under blind knowledge and says so
    assert (
        main(["tune", str(space), "--num-samples", "6", "--max-concurrent", "2", "--seed", "1", "--knowledge", "blind"])
        == 0
    )
    client, trials = runs(workdir, query="tags.role = 'trial'")
    assert len(trials) == 6
    lengths = sorted(len(metric_steps(client, t.info.run_id, "val_acc")) for t in trials)
    print("reports per trial under ASHA:", lengths)
    assert lengths[0] < 6 and lengths[-1] == 6, "some trials stopped early, the best ran to max_t"
    assert all(t.info.status == "FINISHED" for t in trials)
    # no GPU here: the automatic share is 0 and every trial records that it trained on the CPU
    assert {t.data.tags.get("device") for t in trials} == {"cpu"}
    _, (sweep,) = runs(workdir, query="tags.role = 'sweep'")
    assert sweep.data.tags["gpus_per_trial"] == "0"
    assert {t.data.tags["knowledge"] for t in [sweep, *trials]} == {"blind"}
    # --max-concurrent 2 holds for random search too (Tune used to ignore it there)
    spans = [(t.info.start_time, t.info.end_time) for t in trials]
    overlap = max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)
    assert overlap <= 2, f"{overlap} trials ran at once"
    table = Path(client.download_artifacts(sweep.info.run_id, "trials.csv", str(tmp_path))).read_text().splitlines()
    assert table[0].startswith("trial_id,run_id,status,step,val_acc") and len(table) == 1 + 6


def test_optuna_pareto_sweep_returns_a_front(ray_session, workdir, capsys):
    assert (
        main(
            [
                "tune",
                str(SPACES / "badnets.yaml"),
                "--searcher",
                "optuna",
                "--objective",
                "pareto",
                "--scheduler",
                "fifo",
                "--num-samples",
                "4",
                "--quick",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "Pareto front" in out
    client, sweeps = runs(workdir, query="tags.role = 'sweep'")
    (sweep,) = sweeps
    front = json.loads(Path(client.download_artifacts(sweep.info.run_id, "pareto.json")).read_text())
    assert 1 <= len(front) <= 4
    _, trials = runs(workdir, query="tags.role = 'trial'")
    marked = {t.info.run_id for t in trials if t.data.tags.get("pareto") == "true"}
    assert marked == {f["run_id"] for f in front}
    drawn = {Path(a.path).name for a in client.list_artifacts(sweep.info.run_id, "plots")}
    assert {"pareto.png", "search_history.png", "param_importance.png"} <= drawn, drawn
    points = [(t.data.metrics["val_acc"], t.data.metrics["val_asr"]) for t in trials]
    for f in front:  # nothing dominates a front member
        assert not any(
            a >= f["val_acc"] and s <= f["val_asr"] and (a > f["val_acc"] or s < f["val_asr"]) for a, s in points
        )


def test_a_failing_trial_ends_failed_and_the_sweep_returns_the_others(ray_session, workdir, monkeypatch, capsys):
    monkeypatch.setenv("BDO_FAULT", "raise:step=1:trial=1")
    monkeypatch.setenv("BDO_PROGRESS_INTERVAL", "1")  # a summary line each second (a minute for users)
    code = main(["tune", str(SPACES / "badnets.yaml"), "--num-samples", "3", "--quick", "--max-failures", "0"])
    assert code == 1, "a failed run makes the exit code 1"
    _, trials = runs(workdir, query="tags.role = 'trial'")
    statuses = sorted(t.info.status for t in trials)
    assert statuses == ["FAILED", "FINISHED", "FINISHED"], statuses
    _, sweeps = runs(workdir, query="tags.role = 'sweep'")
    assert sweeps[0].info.status == "FINISHED" and sweeps[0].data.tags.get("best_run_id")
    out = capsys.readouterr().out
    assert "FAILED" in out
    summaries = [line for line in out.splitlines() if line.startswith("badnets: progress  ")]
    assert len(summaries) >= 3, out
    pattern = (
        r"badnets: progress  running \d+  pending \d+  finished \d/3  errored [01]  "
        r"best val_\w+ (\d\.\d{3}|-)  elapsed 0:\d\d:\d\d"
    )
    assert all(re.fullmatch(pattern, line) for line in summaries), summaries
