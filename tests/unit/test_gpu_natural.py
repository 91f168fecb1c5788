"""scripts/gpu-natural.py, the natural-image GPU check, in its CPU test form (--tiny) on a fake cifar10-jpeg archive
written into tmp_path: every attack and defense runs and gets finite metrics, the overrides and the shortened
epochs are recorded, nothing is imported from Ray or MLflow, and the budget skips what would start after it."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-natural.py"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# 100 training images per class: --tiny holds out 1% for validation, so 10 images (9 or so outside the target
# class) give the validation ACC and ASR; it keeps 400 of the rest and 200 test images.
COUNTS = {"train": 100, "test": 20}


def write_archive(data_root: Path) -> None:
    """data_root/cifar10-jpeg.tar.gz: train/<class>/NNNN.jpg and test/<class>/NNNN.jpg, 32x32 RGB noise."""
    rng = np.random.default_rng(0)
    data_root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(data_root / "cifar10-jpeg.tar.gz", "w:gz") as tar:
        for split, count in COUNTS.items():
            for name in CLASSES:
                for i in range(count):
                    buffer = io.BytesIO()
                    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
                    member = tarfile.TarInfo(f"{split}/{name}/{i:04d}.jpg")
                    member.size = buffer.tell()
                    buffer.seek(0)
                    tar.addfile(member, buffer)


def load_script():
    """The script as a module (its main() is guarded), without running it."""
    spec = importlib.util.spec_from_file_location("gpu_natural", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def finite(value) -> bool:
    return isinstance(value, float) and math.isfinite(value)


@pytest.mark.slow
def test_tiny_check_runs_every_method_without_ray_or_mlflow(tmp_path):
    write_archive(tmp_path / "data")
    out = tmp_path / "natural.json"
    argv = [
        "--device",
        "cpu",
        "--tiny",
        "--data-root",
        str(tmp_path / "data"),
        "--json",
        str(out),
        "--defense-set",
        "asd.seed_num=5",
    ]
    # The whole run in one interpreter, then its modules: a lazy import inside a method counts as well.
    code = (
        f"import runpy, sys; sys.argv = [{str(SCRIPT)!r}, *{argv!r}]\n"
        f"try:\n    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
        f"except SystemExit as stop:\n    code = stop.code\n"
        f"loaded = sorted(m for m in ('ray', 'mlflow', 'orchestrator') if m in sys.modules)\n"
        f"assert not loaded, f'imported {{loaded}}'\nsys.exit(code)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"check failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    record = json.loads(out.read_text())

    assert record["results_are"] == "CIFAR-10 (JPEG copy)" and record["tiny"] is True
    assert record["model"] == "small_cnn" and record["machine"]["device"] == "cpu"
    assert {k: record["data"][k] for k in ("dataset", "train", "val", "test", "classes")} == {
        "dataset": "cifar10_jpeg",
        "train": 400,
        "val": 10,
        "test": 200,
        "classes": 10,
    }
    assert list(record["attacks"]) == ["badnets", "blend"]
    for attack, entry in record["attacks"].items():
        assert entry["epochs"] == {"run": 1, "preset": 100, "shortened": True}
        assert entry["config"]["epochs"] == 1 and entry["config"]["poison_rate"] == 0.1, "the preset, then the cut"
        assert entry["preset"] == f"search_spaces/presets/cifar10/{attack}.yaml"
        assert set(entry["defenses"]) == {"aft", "dbr", "asd"}
        for name, run in [(attack, entry), *entry["defenses"].items()]:
            assert "error" not in run and "skipped" not in run, f"{attack} {name}: {run}"
            assert all(finite(run["metrics"][k]) for k in ("test_acc", "test_asr", "val_acc", "val_asr")), run
            assert run["wall_s"] >= 0
        asd = entry["defenses"]["asd"]
        assert asd["overrides"] == {"epochs": 1, "iterations_per_epoch": 2, "seed_num": 5}
        assert asd["config"]["seed_num"] == 5 and asd["config"]["batch_size"] == 64, "the preset under the overrides"
    assert "CIFAR-10 (JPEG copy)" in proc.stdout and "blend    asd" in proc.stdout, "the table"


def test_steps_after_the_budget_are_skipped_with_the_reason(tmp_path):
    write_archive(tmp_path / "data")
    out = tmp_path / "natural.json"
    code = load_script().main(
        [
            "--device",
            "cpu",
            "--tiny",
            "--data-root",
            str(tmp_path / "data"),
            "--json",
            str(out),
            "--budget-s",
            "0",
            "--defenses",
            "aft",
        ]
    )
    record = json.loads(out.read_text())
    assert code == 0 and record["data"]["train"] == 400, "the data is loaded whatever the budget"
    for entry in record["attacks"].values():
        assert entry["skipped"].startswith("budget:") and "metrics" not in entry
        assert entry["defenses"]["aft"]["skipped"].endswith("model was not trained")


def test_defense_overrides_name_a_defense_that_runs():
    script = load_script()
    assert script.parse_defense_sets(["dbr.br_rounds=4", "dbr.br_lr=0.001"], ["dbr"]) == {
        "dbr": {"br_rounds": 4, "br_lr": 0.001}
    }, "YAML values, as --set parses them"
    for bad in ("asd.epochs=3", "dbr=3", "dbr.br_rounds"):
        with pytest.raises(SystemExit):
            script.parse_defense_sets([bad], ["dbr"])
    with pytest.raises(SystemExit, match="dbr: unknown key"):
        script.method_config("dbr", "defense", {"rounds": 4})
    with pytest.raises(SystemExit, match="badnets: not one of the defenses"):
        script.method_config("badnets", "defense", {})
