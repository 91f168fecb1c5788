"""The benchmark suite (benchmarks/): it runs, fills every row of its table with finite positive figures, and
its pure-torch part runs without ray and mlflow. No test here ever asserts a timing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import Goal, Row, synthetic_train_for
from benchmarks.report import table_lines
from benchmarks.suite import all_cases, batches, select

ROOT = Path(__file__).resolve().parents[2]


def run_suite(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--device", "cpu", "--json", str(out), *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, f"suite failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text()), proc.stdout


def positive(value) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def assert_filled(row: dict) -> None:
    assert row["status"] == "ok", f"{row['name']}: {row['status']} ({row['note']})"
    for key in ("measured", "baseline", "ratio", "peak_host_mb"):
        assert positive(row[key]), f"{row['name']}: {key} = {row[key]!r}"


# ----------------------------------------------------------------------------------------- no processes
def test_synthetic_size_leaves_exactly_the_wanted_training_images():
    for wanted in (512, 10_000, 50_000):
        n = synthetic_train_for(wanted)
        assert n - int(round(0.05 * n)) == wanted


def test_ratio_goal_and_round_trip():
    row = Row(name="x", measured=2.0, baseline=4.0, unit="s", goal=Goal("ratio", "<=", 1.05))
    assert row.ratio == 0.5 and row.goal.met(row) is True
    assert Goal("measured", ">=", 60_000).met(Row(name="y", measured=50_000.0, baseline=1.0)) is False
    back = Row.from_dict(json.loads(json.dumps(row.to_dict())))
    assert back.ratio == 0.5 and back.goal == row.goal
    assert math.isnan(Row(name="z", measured=1.0).ratio)


def test_selection_by_name_and_prefix():
    cases = all_cases()
    assert {c.name for c in select(cases, "train.small_cnn")} == {"train.small_cnn"}
    assert {c.name for c in select(cases, "sweep.naive")} == {"sweep"}
    assert all(c.name.startswith("pgd.") for c in select(cases, "pgd")) and len(select(cases, "pgd")) == 3
    with pytest.raises(ValueError, match="no benchmark named"):
        select(cases, "nonsense")
    grouped = batches(select(cases, None))
    ray = [b for b in grouped if b[0].group == "ray"]
    assert len(ray) == 1 and {c.name for c in ray[0]} == {
        "orchestrator.epoch",
        "orchestrator.epoch.short",
        "sweep",
        "tune.trivial",
    }


def test_table_marks_skipped_rows_and_missing_numbers():
    rows = [Row(name="a", measured=1500.0, baseline=500.0, unit="img/s"), Row(name="b", status="skipped")]
    lines = table_lines(rows)
    assert "1,500 img/s" in lines[2] and "3.00" in lines[2]
    assert "SKIPPED" in lines[3]
    assert lines[0].startswith("benchmark")


# ---------------------------------------------------------------------------------------- the suite itself
@pytest.mark.timeout(900)  # runs the pure-torch rows of the suite in a subprocess (about 2 min on 2 cores)
def test_pure_torch_rows_run_without_ray_and_mlflow(tmp_path):
    """As on a machine with only torch and torchvision: the orchestrator rows are skipped with a note."""
    data, stdout = run_suite(
        tmp_path, "--only", "fct.small_cnn,tune.trivial,sweep", env={"BDO_BENCH_HIDE": "ray,mlflow"}
    )
    rows = {r["name"]: r for r in data["rows"]}
    assert set(rows) == {"fct.small_cnn", "tune.trivial", "sweep.reuse", "sweep.naive"}
    assert_filled(rows["fct.small_cnn"])
    for name in ("tune.trivial", "sweep.reuse", "sweep.naive"):
        assert rows[name]["status"] == "skipped" and "not installed" in rows[name]["note"]
    assert "fct.small_cnn" in stdout and "SKIPPED" in stdout


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 5 minutes alone on 2 cores; under the other xdist worker's load it can take 3x
def test_quick_suite_fills_every_row(tmp_path):
    data, stdout = run_suite(tmp_path)
    rows = {r["name"]: r for r in data["rows"]}
    expected = {r: c for c in all_cases() for r in c.rows}
    assert set(rows) == set(expected)
    for name, case in expected.items():
        if case.gpu_only:
            assert rows[name]["status"] == "skipped", name
        else:
            assert_filled(rows[name])
        assert name in stdout
    assert data["machine"]["nproc"] >= 1 and data["command"].endswith("--json " + str(tmp_path / "bench.json"))
