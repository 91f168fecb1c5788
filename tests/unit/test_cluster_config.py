"""cluster.yaml and the on-prem example validate offline against Ray's own schema and cross-field checks."""

from __future__ import annotations

import copy
import re
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


def test_mlflow_answers_the_workers_and_the_readmes_port_forward():
    """Workers log to the head's private address; `ray attach -p 5000` forwards to the head's loopback."""
    commands = yaml.safe_load((ROOT / "cluster.yaml").read_text())["head_setup_commands"]
    private = "$(hostname -I | awk '{print $1}')"
    (server,) = [c for c in commands if "mlflow server" in c and "pkill" not in c]
    assert f"--host {private} --port 5000" in server
    (relay,) = [c for c in commands if c.startswith("nohup socat")]
    assert "TCP-LISTEN:5000,bind=127.0.0.1," in relay and f"TCP:{private}:5000" in relay
    assert "ray attach cluster.yaml -p 8265 -p 5000" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_pkill_does_not_match_its_own_shell(path):
    """Ray runs each command as `bash -c '... pkill -f PATTERN ...'`: a plain pattern matches that shell too."""
    commands = yaml.safe_load(path.read_text())["head_setup_commands"]
    patterns = re.findall(r'pkill -f "([^"]+)"', " ".join(commands))
    assert patterns and all(not re.search(p, f'pkill -f "{p}"') for p in patterns), patterns


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_ray_starts_with_the_venv_first_on_path(path):
    """A job's entrypoint (`ray job submit ... -- bdo tune`) inherits Ray's PATH, so `bdo` must be on it."""
    cfg = yaml.safe_load(path.read_text())
    starts = [
        c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in cfg[key] if "ray start" in c
    ]
    assert len(starts) == 2
    for command in starts:
        assert re.match(r"export PATH=\$HOME/bdo/\.venv/bin:\$PATH[ ;]", command), command


def test_the_token_comes_from_the_users_machine_not_the_repo():
    for path in FILES:
        source = yaml.safe_load(path.read_text())["file_mounts"]["~/.ray/auth_token"]
        assert source.startswith("~/"), "the token file lives outside the repository"
        assert not (ROOT / Path(source).name).exists()
