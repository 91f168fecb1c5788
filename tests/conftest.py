"""Shared fixtures. One backdoored model per (attack, settings) is trained once per test session and shared by
every test that needs it, so the suite stays within its time budget on 2 cores."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# MLflow system metrics (a sampling thread per run) are on for users; tests that check them switch them on.
os.environ.setdefault("BDO_SYSTEM_METRICS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import methods  # noqa: E402, F401  (registers everything)
from methods.attacks.base import Backdoor  # noqa: E402
from methods.core.context import LocalContext  # noqa: E402
from methods.core.method import get_method  # noqa: E402

torch.set_num_threads(2)


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default="cpu",
        help="where method tests train: cpu (the reference path, default) or cuda (make test-gpu)",
    )


def pytest_configure(config):
    # Methods train on default_device(); the suite pins it so `make test` on a GPU box still checks the CPU
    # reference path, and `make test-gpu` (--device cuda) runs the same tests on the GPU.
    os.environ["BDO_DEVICE"] = config.getoption("--device")


@pytest.fixture(autouse=True)
def _user_store_variable_kept():
    """bdo reads MLFLOW_TRACKING_URI as the user's default store, and mlflow.set_tracking_uri exports it: a test that
    leaves it set (to a server it has since stopped) would send every later command in the suite there."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


SLOW_TIMEOUT = 900  # seconds; pyproject's default (300) is for the rest


def pytest_collection_modifyitems(config, items):
    # A slow test (efficacy training, a sweep) may take minutes on a loaded 2-core runner: it gets a longer timeout
    # than the default unless it names its own, so only a hung test times out.
    for item in items:
        if "slow" in item.keywords and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))
    wanted = config.getoption("--device")
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason=f"--device {wanted}: no CUDA device is visible here")
        for item in items:
            item.add_marker(skip)
        return
    if not torch.cuda.is_available():
        skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


# The digits attack every defense test starts from: BadNets/Blend all2one at 10% on small_cnn.
DIGITS_ATTACK = dict(
    dataset="digits", model="small_cnn", epochs=15, lr=0.05, poison_rate=0.1, label_mode="all2one", target=0, seed=0
)

_BACKDOORS: dict[tuple, Backdoor] = {}


def train_backdoor(attack: str = "badnets", **overrides) -> Backdoor:
    """Train (once per session) and return the backdoored digits model of `attack` with these settings."""
    settings = {**DIGITS_ATTACK, **overrides}
    key = (attack, tuple(sorted(settings.items())))
    if key not in _BACKDOORS:
        spec = get_method(attack)
        _BACKDOORS[key] = spec.run(LocalContext(), spec.make_config(settings))
    return _BACKDOORS[key]


@pytest.fixture(scope="session")
def badnets_backdoor() -> Backdoor:
    return train_backdoor("badnets")


@pytest.fixture(scope="session")
def blend_backdoor() -> Backdoor:
    return train_backdoor("blend")


@pytest.fixture(scope="session", params=["badnets", "blend"])
def digits_backdoor(request) -> Backdoor:
    """Parametrises a defense test over the two attacks its issue names."""
    return train_backdoor(request.param)


@pytest.fixture(scope="session")
def clean_reference() -> Backdoor:
    """Clean training: the attack recipe at poison rate 0 (what from-scratch defenses are held against)."""
    return train_backdoor("badnets", poison_rate=0.0)


@pytest.fixture
def oracle_metrics_nan(monkeypatch):
    """Makes every oracle metric (methods/core/knowledge.py) that the named functions return NaN: a choice made
    under blind knowledge must come out the same, since it may not read them. Call it with (module, function name)
    pairs, naming each function where the method under test looks it up; a function that returns one number
    (SD's val_fct_auroc) is named for an oracle metric and returns NaN."""
    from methods.core.knowledge import ORACLE, knowledge_of

    def poison(result):
        if not isinstance(result, dict):
            return float("nan")
        return {k: float("nan") if knowledge_of(k) == ORACLE else v for k, v in result.items()}

    def apply(*targets: tuple) -> None:
        for module, name in targets:
            real = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *a, real=real, **k: poison(real(*a, **k)))

    return apply
