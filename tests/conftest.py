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
# Ray runs its workers at nice 15, so that its own daemons stay responsive. Beside another test's training (the other
# xdist worker, a study's spawned runs, both at nice 0) a trial then gets a few percent of a core: a 3-epoch trial on
# 512 images took 4 minutes and the benchmark suite timed out. Every Ray a test starts inherits this.
os.environ.setdefault("RAY_worker_niceness", "0")

import methods  # noqa: E402, F401  (registers everything)
from methods.attacks.base import Backdoor  # noqa: E402
from methods.core.context import LocalContext  # noqa: E402
from methods.core.method import get_method  # noqa: E402

# `make test` runs two xdist workers on the 2-core runner: one torch thread each, and the commands a test starts
# inherit one too (OMP_NUM_THREADS), since two 1-thread processes train ~1.5x faster than two 2-thread ones that
# fight over the cores. A plain `pytest` (one process) uses both cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
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


# The longest tests (minutes each on 2 cores), started first so that neither xdist worker is left with one of them
# at the end while the other idles.
LONGEST_FIRST = (
    "tests/integration/test_robustness.py",
    "tests/integration/test_readme.py",
    "tests/unit/test_benchmarks.py::test_quick_suite_fills_every_row",
    "tests/integration/test_cluster_journey.py",
    "tests/integration/test_quickstart.py",
    "tests/integration/test_multinode.py",
    "tests/methods/test_pbe.py::test_pbe_does_not_depend_on_its_first_draw",
    "tests/integration/test_blind_vs_oracle.py",
)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: next((i for i, p in enumerate(LONGEST_FIRST) if item.nodeid.startswith(p)), 99))
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


# The bar the digits efficacy tests hold a defense to: test ASR at most 0.10 in every cell; test ACC lost at most 3
# points on average over a defense's cells (tests/integration/test_robustness.py holds the mean over unseen seeds)
# and at most 5 in any one cell. A cell is a 360-image test split, where three flipped images are a point, and the
# same command gives different floats on different CPUs: defenses that lose 1-4 points a cell land on either side
# of 3 by machine (an AMD EPYC runner: ARGD on Blend 3.6, D-BR on Blend 3.04, where the tuning machine passed both).
MAX_ASR, MAX_MEAN_ACC_LOSS, MAX_CELL_ACC_LOSS = 0.10, 0.03, 0.05


def meets_cell_bar(after: dict, reference: dict) -> bool:
    """One cell against the bar: `reference` is the backdoored model, or the clean one for a defense that trains
    a new model from the poisoned set."""
    return after["test_asr"] <= MAX_ASR and reference["test_acc"] - after["test_acc"] <= MAX_CELL_ACC_LOSS


def assert_defended(name: str, after: dict, reference: dict) -> None:
    assert meets_cell_bar(after, reference), (
        f"{name}: test ASR {after['test_asr']:.3f} (at most {MAX_ASR}), test ACC {reference['test_acc']:.3f} -> "
        f"{after['test_acc']:.3f} (at most {MAX_CELL_ACC_LOSS} lost)"
    )


# The digits attack every defense test starts from: BadNets/Blend all2one at 10% on small_cnn.
DIGITS_ATTACK = dict(
    dataset="digits", model="small_cnn", epochs=15, lr=0.05, poison_rate=0.1, label_mode="all2one", target=0, seed=0
)

_BACKDOORS: dict[tuple, Backdoor] = {}

# Attacks whose own config fields only shape the trigger: with nothing poisoned they train exactly BadNets' clean
# recipe (WaNet's rotation and CL's clean model change training itself, so they keep their own clean runs).
TRIGGER_ONLY_FIELDS = {"badnets", "blend", "sig", "trojan"}


def clean_recipe(attack: str, settings: dict) -> tuple[str, dict]:
    """The (attack, settings) that trains the same clean model: a trigger-only attack at poison rate 0 is BadNets
    at rate 0 with the shared training fields, so the clean references of several attacks are trained once."""
    if attack not in TRIGGER_ONLY_FIELDS or settings.get("poison_rate") != 0.0:
        return attack, settings
    from methods.attacks.configs.shared import AttackConfig

    shared = set(AttackConfig.__dataclass_fields__) - {"label_mode", "target", "poison_index_mode"}
    return "badnets", {k: v for k, v in settings.items() if k in shared}


def train_backdoor(attack: str = "badnets", data_config=None, **overrides) -> Backdoor:
    """Train (once per session) and return the backdoored model of `attack` with these settings, on digits unless
    `data_config` names other data."""
    attack, settings = clean_recipe(attack, {**DIGITS_ATTACK, **overrides})
    key = (attack, repr(data_config), tuple(sorted(settings.items())))
    if key not in _BACKDOORS:
        spec = get_method(attack)
        _BACKDOORS[key] = spec.run(LocalContext(data_config=data_config), spec.make_config(settings))
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
