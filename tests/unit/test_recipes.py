"""Named recipes (docs/search-spaces.md#recipes): a sub-folder of a dataset's presets layered over them, with its
own dataset options; and datasets that share another's presets (cifar10_jpeg reads presets/cifar10/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from methods.core.method import METHODS
from methods.data.configs import DATASET_INFOS
from orchestrator.errors import BadInput
from orchestrator.resolve import PRESETS, RECIPE_FILE, load_preset, recipes, resolve_run
from orchestrator.spaces import load_space, plan_sweep

ROOT = Path(__file__).resolve().parents[2]
RECIPE_DIRS = sorted(p.parent for p in PRESETS.glob(f"*/*/{RECIPE_FILE}"))


def test_cifar10_jpeg_trains_with_cifar10_presets():
    spec = resolve_run("badnets", "cifar10_jpeg", "small_cnn", 0)
    assert spec.presets == ["search_spaces/presets/cifar10/badnets.yaml"]
    assert spec.attack_config["epochs"] == 100 and spec.attack_config["pattern"] == "grid"
    assert spec.recipe is None and spec.data_config["train_limit"] is None


def test_cpu_recipe_layers_over_the_paper_recipe():
    spec = resolve_run("wanet", "cifar10_jpeg", "small_cnn", 0, recipe="cpu")
    assert spec.presets == ["search_spaces/presets/cifar10/wanet.yaml", "search_spaces/presets/cifar10/cpu/wanet.yaml"]
    paper, _ = load_preset("cifar10", "wanet")
    layer = yaml.safe_load((PRESETS / "cifar10" / "cpu" / "wanet.yaml").read_text())
    for key, value in {**paper, **layer}.items():  # the recipe's keys win, the paper's others stay
        assert spec.attack_config[key] == value, key
    assert spec.data_config["train_limit"] == 10000 and spec.data_config["test_limit"] == 2000
    assert spec.flat_params()["recipe"] == "cpu"


def test_set_and_space_data_win_over_the_recipe():
    spec = resolve_run("badnets", "cifar10", "small_cnn", 0, recipe="cpu", sets={"epochs": 3, "data.train_limit": 500})
    assert spec.attack_config["epochs"] == 3 and spec.data_config["train_limit"] == 500
    spec = resolve_run("ft", "cifar10", "small_cnn", 0, recipe="cpu", data_base={"test_limit": 300})
    assert spec.data_config["test_limit"] == 300 and spec.data_config["train_limit"] == 10000


def test_no_preset_turns_the_recipe_off_too():
    spec = resolve_run("badnets", "cifar10", "small_cnn", 0, recipe="cpu", use_preset=False)
    assert spec.presets == [] and spec.recipe is None and spec.data_config["train_limit"] is None


def test_unknown_recipe_is_one_line_naming_the_known_ones():
    with pytest.raises(BadInput, match=r"--recipe gpu: cifar10 has no such recipe \(known: cpu\)"):
        resolve_run("badnets", "cifar10", "small_cnn", 0, recipe="gpu")
    with pytest.raises(BadInput, match=r"digits has no such recipe \(known: none\)"):
        resolve_run("ft", "digits", "small_cnn", 0, recipe="cpu")


def test_space_file_may_name_a_recipe(tmp_path):
    text = (ROOT / "search_spaces" / "ft.yaml").read_text()
    path = tmp_path / "ft.yaml"
    path.write_text(text + "\nrecipe: cpu\n")
    plan = plan_sweep(load_space(path), dataset="cifar10_jpeg", seed=0)
    assert plan.base.recipe == "cpu" and plan.base.data_config["train_limit"] == 10000


@pytest.mark.parametrize("folder", RECIPE_DIRS, ids=[str(p.relative_to(PRESETS)) for p in RECIPE_DIRS])
def test_every_recipe_file_is_valid(folder):
    """Each recipe's presets name real config keys with valid values, for every dataset that reads them."""
    dataset = folder.parent.name
    readers = [name for name, info in DATASET_INFOS.items() if info.preset_folder == dataset]
    assert readers, f"{folder}: no dataset reads presets/{dataset}"
    assert folder.name in recipes(readers[0])
    for path in sorted(folder.glob("*.yaml")):
        if path.name == RECIPE_FILE:
            continue
        assert path.stem in METHODS, f"{path}: no method {path.stem}"
        for name in readers:
            resolve_run(path.stem, name, "small_cnn", 0, recipe=folder.name)  # raises BadInput on a bad value


def _bdo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).with_name("bdo")), *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def test_dry_run_prints_the_recipe_and_its_files(tmp_path):
    missing = _bdo(
        "attack", "sig", "--dataset", "cifar10_jpeg", "--recipe", "cpu", "--data-root", str(tmp_path), "--dry-run"
    )
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "cifar10_jpeg not found" in missing.stderr and "cifar10-jpeg.tar.gz" in missing.stderr
    for split in ("train", "test"):  # one image a class is enough for the plan
        for name in DATASET_INFOS.get("cifar10_jpeg").classes:
            (tmp_path / "cifar10-jpeg" / split / name).mkdir(parents=True)
            Image.new("RGB", (32, 32), (len(name) * 9, 0, 0)).save(tmp_path / "cifar10-jpeg" / split / name / "0.png")
    common = ("attack", "sig", "--dataset", "cifar10_jpeg", "--data-root", str(tmp_path), "--dry-run")
    plan = yaml.safe_load(_bdo(*common, "--recipe", "cpu").stdout)
    assert plan["recipe"] == "cpu" and plan["data"]["train_limit"] == 10000 and plan["config"]["epochs"] == 20
    assert plan["presets"] == ["search_spaces/presets/cifar10/sig.yaml", "search_spaces/presets/cifar10/cpu/sig.yaml"]
    plan = yaml.safe_load(_bdo(*common, "--recipe", "cpu", "--no-preset").stdout)
    assert plan["recipe"] is None and plan["presets"] == []
