"""bdo run as a Ray job (`ray job submit --runtime-env-json ...`): ray.init's runtime env must merge with the job's."""

from __future__ import annotations

import json

import pytest

from orchestrator import session as session_module


def test_a_variable_the_job_sets_is_left_to_the_job():
    wanted = {"MLFLOW_TRACKING_URI": "http://10.0.0.1:5000", "PYTHONPATH": "/bdo", "RAY_CHDIR_TO_TRIAL_DIR": "0"}
    job = {"MLFLOW_TRACKING_URI": "http://10.0.0.2:5000", "BDO_GIT_COMMIT": "abc"}
    assert session_module.without_job_env_vars(wanted, job) == {"PYTHONPATH": "/bdo", "RAY_CHDIR_TO_TRIAL_DIR": "0"}
    assert session_module.without_job_env_vars(wanted, {}) == wanted


def test_start_ray_inside_a_job_passes_a_runtime_env_ray_can_merge(monkeypatch, tmp_path):
    ray = pytest.importorskip("ray")
    from ray.runtime_env.runtime_env import _merge_runtime_env

    job_env = {
        "working_dir": "gcs://_ray_pkg_0.zip",
        "env_vars": {"MLFLOW_TRACKING_URI": "http://10.0.0.2:5000", "BDO_DATA_ROOT": "/shared/data"},
    }
    # what the job supervisor gives the entrypoint: the job's config, and the job's env vars in its environment
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": job_env, "metadata": {}}))
    for key, value in job_env["env_vars"].items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("RAY_CHDIR_TO_TRIAL_DIR", "0")
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray, "nodes", lambda: [])
    session = session_module.Session("http://10.0.0.2:5000", "bdo", tmp_path, tmp_path, address="auto", verbose=True)
    session.start_ray()
    (kwargs,) = calls
    merged = _merge_runtime_env(job_env, kwargs["runtime_env"])
    assert merged is not None, "Ray refuses to merge the job's runtime env with bdo's"
    assert merged["env_vars"]["MLFLOW_TRACKING_URI"] == "http://10.0.0.2:5000"
    assert merged["env_vars"]["RAY_CHDIR_TO_TRIAL_DIR"] == "0" and "PYTHONPATH" in merged["env_vars"]
