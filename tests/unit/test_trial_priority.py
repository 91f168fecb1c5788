"""The trials of a local Ray that bdo starts run at the default priority, not Ray's niceness 15: beside other work
at priority 0 a nice-15 trial got about 1/28 of a shared core (benchmarks/RESULTS.md). A user's own
RAY_worker_niceness still wins, and bdo's process environment is left as it was."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.session import environment_default

ROOT = Path(__file__).resolve().parents[2]
NAME = "BDO_TEST_ENVIRONMENT_DEFAULT"


def test_environment_default_sets_only_what_is_unset_and_restores_it(monkeypatch):
    monkeypatch.delenv(NAME, raising=False)
    with environment_default(NAME, "0"):
        assert os.environ[NAME] == "0"
    assert NAME not in os.environ
    monkeypatch.setenv(NAME, "15")
    with environment_default(NAME, "0"):
        assert os.environ[NAME] == "15"
    assert os.environ[NAME] == "15"


PROBE = """
import os, tempfile
from pathlib import Path
import ray
from orchestrator.session import Session

with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    session = Session(f"sqlite:///{tmp / 'mlflow.db'}", "bdo", tmp / "runs", tmp / "data")
    session.start_ray(num_cpus=1)
    niceness = ray.get(ray.remote(lambda: os.nice(0)).remote())
    print(niceness, os.environ.get("RAY_worker_niceness", "unset"))
    session.stop_ray()
"""


@pytest.mark.timeout(300)
def test_a_trial_of_bdos_local_ray_runs_at_the_default_priority():
    pytest.importorskip("ray")
    # a fresh process: the suite's own session Ray (tests/integration/conftest.py) may already run in this one
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["0", "unset"], done.stdout
