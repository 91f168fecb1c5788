"""Finding out what exists and what a command would do, without running anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from methods.core.method import METHODS, method_names
from methods.core.registry import DATASETS, MODELS
from orchestrator.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
SPACES = ROOT / "search_spaces"


@pytest.mark.parametrize(
    "kind, names",
    [
        ("attacks", method_names("attack")),
        ("defenses", method_names("defense")),
        ("datasets", DATASETS.names()),
        ("models", MODELS.names()),
    ],
)
def test_list_names_everything_registered_with_a_summary(kind, names, capsys):
    assert main(["list", kind]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == names
    assert all(len(line.split()) > 1 for line in lines), "every entry has a one-line summary"


@pytest.mark.parametrize("name", method_names())
def test_describe_shows_every_field_the_presets_and_the_space(name, capsys):
    assert main(["describe", name]) == 0
    out = capsys.readouterr().out
    import dataclasses

    for field in dataclasses.fields(METHODS.get(name).config_cls):
        assert f"  {field.name}: " in out, field.name
    for preset in SPACES.glob(f"presets/*/{name}.yaml"):
        assert str(preset.relative_to(ROOT)) in out
    assert f"search_spaces/{name}.yaml" in out


def test_version_and_unknown_names(capsys):
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("bdo ")
    assert main(["describe", "nope"]) == 2 and "unknown method" in capsys.readouterr().err


def test_experiment_defaults_to_mlflow_experiment_name(monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "my-study")
    assert build_parser().parse_args(["attack", "badnets"]).experiment == "my-study"
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    assert build_parser().parse_args(["attack", "badnets"]).experiment == "bdo"


@pytest.mark.parametrize(
    "argv",
    [
        ["tune", str(SPACES / "dbr.yaml"), "--set", "br_rounds=7"],
        ["attack", "badnets", "--set", "epochs=3"],
        ["defend", "ft", "--attack", "blend", "--set", "attack.alpha=0.2"],
    ],
    ids=["tune", "attack", "defend"],
)
def test_dry_run_prints_the_resolved_plan_and_writes_nothing(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--dry-run"]) == 0
    plan = yaml.safe_load(capsys.readouterr().out)
    assert os.listdir(tmp_path) == [], "a dry run writes nothing"
    if argv[0] == "tune":
        assert plan["method"] == "dbr" and plan["config"]["br_rounds"] == 7 and "br_rounds" in plan["pinned"]
        assert plan["resources"]["gpus_per_trial_resolved"] == 0 and plan["resources"]["attack_device"] == "cpu"
        assert plan["presets"], "the digits preset is part of the resolved plan"
    elif argv[0] == "attack":
        assert plan["config"]["epochs"] == 3 and plan["device"] == "cpu"
    else:
        assert plan["attack"] == "blend" and plan["attack_config"]["alpha"] == 0.2


def test_dry_run_of_a_study(tmp_path, monkeypatch, capsys):
    study = tmp_path / "study.yaml"
    study.write_text("attacks: [badnets, blend]\ndefenses: [ft, nad]\nseeds: [0, 1]\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["study", str(study), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("study study: 2 attacks x 2 defenses x seeds [0, 1]")
    assert len(yaml.safe_load(out.split("\n", 1)[1])) == 4
    assert os.listdir(work) == []


@pytest.mark.parametrize("study", sorted(p.name for p in (ROOT / "examples").glob("study-*.yaml")))
def test_every_example_study_validates_without_its_data(study, tmp_path, monkeypatch, capsys):
    """The paper-reproduction studies must stay valid as configs and spaces change, though CI has no CIFAR-10."""
    monkeypatch.chdir(tmp_path)
    assert main(["study", str(ROOT / "examples" / study), "--dry-run", "--data-root", str(tmp_path / "none")]) == 0
    assert capsys.readouterr().out.startswith("study ")
    assert os.listdir(tmp_path) == []


def _bdo_ui(tracking_uri: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "ui", "--tracking-uri", tracking_uri],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_ui_on_a_server_that_runs_elsewhere_prints_where_to_look_and_starts_nothing(tmp_path):
    """`bdo ui --tracking-uri http://...` (the cluster's server, through the port-forward) has nothing to start."""
    from orchestrator.ui import free_port

    class FakeServer(BaseHTTPRequestHandler):  # answers the one call bdo makes: the experiment by name
        def do_GET(self):
            body = json.dumps({"experiment": {"experiment_id": "7", "name": "bdo", "lifecycle_stage": "active"}})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        known = _bdo_ui(url, tmp_path)
    finally:
        server.shutdown()
    assert known.returncode == 0, known.stderr
    assert known.stdout.splitlines() == [
        f"runs of experiment bdo: {url}/#/experiments/7/runs?workflowType=machine_learning"
    ], known.stdout
    nobody = f"http://127.0.0.1:{free_port()}"  # no server there, e.g. the port-forward is not open yet
    unknown = _bdo_ui(nobody, tmp_path)
    assert unknown.returncode == 0, unknown.stderr
    assert unknown.stdout.splitlines() == [f"runs of experiment bdo: {nobody}"], unknown.stdout
    assert "Traceback" not in unknown.stderr, unknown.stderr
    assert os.listdir(tmp_path) == []
