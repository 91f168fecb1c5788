"""cluster.yaml and the on-prem example validate offline against Ray's own schema and cross-field checks."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
FILES = [ROOT / "cluster.yaml", ROOT / "examples" / "cluster-onprem.yaml"]


def validate(cfg: dict) -> dict:
    util = pytest.importorskip("ray.autoscaler._private.util", reason="Ray validates the cluster file")
    full = util.prepare_config(copy.deepcopy(cfg))
    util.validate_config(full)
    return full


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_cluster_files_validate(path):
    full = validate(yaml.safe_load(path.read_text()))
    assert full["cluster_name"].startswith("bdo")


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_a_misspelt_key_fails(path):
    cfg = yaml.safe_load(path.read_text())
    cfg["max_worker"] = cfg.pop("max_workers", 2)
    with pytest.raises(Exception, match="max_worker"):
        validate(cfg)


def test_cluster_yaml_has_what_the_workflow_needs():
    text = (ROOT / "cluster.yaml").read_text()
    cfg = yaml.safe_load(text)
    gpu_types = [n for n, t in cfg["available_node_types"].items() if t["resources"].get("GPU")]
    assert gpu_types and all(cfg["available_node_types"][n]["max_workers"] > 0 for n in gpu_types)
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert "~/.ray/auth_token" in cfg["file_mounts"], "the token is shipped by file mounts"
    assert "RAY_AUTH_MODE=token" in text
    assert "uv sync --frozen" in text, "nodes install from the lockfile"
    assert "nfs" in text and "/shared" in text
    mlflow = " ".join(cfg["head_setup_commands"])
    assert "mlflow server" in mlflow and "0.0.0.0" not in mlflow and "sqlite:////home" in mlflow
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])


def test_the_token_comes_from_the_users_machine_not_the_repo():
    for path in FILES:
        source = yaml.safe_load(path.read_text())["file_mounts"]["~/.ray/auth_token"]
        assert source.startswith("~/"), "the token file lives outside the repository"
        assert not (ROOT / Path(source).name).exists()
