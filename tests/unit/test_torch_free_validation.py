"""Validation never imports torch or ray: bad input fails in well under the ~2 s that `import torch` costs, and
`--dry-run` says what would run without paying for it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from methods.core import hardware

ROOT = Path(__file__).resolve().parents[2]

# Each command goes through orchestrator.cli.main in one fresh interpreter, which then reports what it imported.
PROBE = """
import json, sys
from orchestrator.cli import main
codes = [main(argv) for argv in json.loads(sys.argv[1])]
print(json.dumps({"codes": codes, "loaded": sorted(m for m in ("torch", "ray") if m in sys.modules)}))
"""


@pytest.mark.skipif(
    hardware.gpu_driver_present(),
    reason="with a GPU driver present, validation asks torch how many GPUs there are (by design)",
)
def test_validation_and_dry_run_import_neither_torch_nor_ray(tmp_path):
    bad_space = tmp_path / "space.yaml"
    bad_space.write_text("method: dbr\nspace:\n  alpha_c: {uniform: [0.1, 0.9]}\n  alpha_p: {uniform: [0.05, 0.5]}\n")
    bad_study = tmp_path / "study.yaml"
    bad_study.write_text("attacks: [{name: badnets, poison_rate: 2.0}]\ndefenses: [ft]\nseeds: [0]\n")
    commands = [
        ["tune", str(bad_space)],  # a cross-field check (alpha_c + alpha_p <= 1) of a defense config
        ["study", str(bad_study)],
        ["defend", "nad", "--set", "lr_steps=[0.1]", "--set", "lr_step_epochs=[2, 4]"],
        ["attack", "badnets", "--dataset", "cifar11"],
        ["attack", "badnets", "--dataset", "cifar10", "--data-root", str(tmp_path / "no-data")],  # missing data
        # valid: every check runs (presets, space bounds at their extremes, data options, GPU share), then the plan
        ["tune", str(ROOT / "search_spaces" / "dbr.yaml"), "--quick", "--set", "br_rounds=3", "--dry-run"],
        ["study", str(ROOT / "examples" / "study-digits.yaml"), "--quick", "--dry-run"],
        ["defend", "pbe", "--attack", "wanet", "--set", "attack.k=8", "--set", "fast.bf16=false", "--dry-run"],
    ]
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(commands)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["codes"] == [2, 2, 2, 2, 2, 0, 0, 0], done.stderr
    assert report["loaded"] == [], f"validation imported {report['loaded']}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml", "study.yaml"], "a dry run wrote something"
