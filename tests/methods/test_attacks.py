"""Attacks on real training: every attack runs, every registered attack implants its backdoor with its digits
preset (on the seed the preset was chosen on and on one it never saw), BadNets all2all and a user trigger file
work, the synthetic set is calibrated, and runs resume bit-identically."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import yaml

from methods.attacks.base import Backdoor, evaluate
from methods.core.context import LocalContext
from methods.core.method import get_method, method_names
from methods.core.registry import MODELS
from methods.data.base import DataConfig, load_splits
from tests.conftest import DIGITS_ATTACK, train_backdoor

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(dataset="digits", model="small_cnn", epochs=1, batch_size=64)


@pytest.mark.parametrize("name", method_names("attack"))
def test_every_attack_trains_one_epoch_and_reports(name):
    spec = get_method(name)
    extra = {"clean_epochs": 1} if name == "cl" else {}
    ctx = LocalContext(data_config=DataConfig(train_limit=300))
    backdoor = spec.run(ctx, spec.make_config({**TINY, **extra}))
    assert isinstance(backdoor, Backdoor) and backdoor.attack == name
    step, metrics = ctx.reports[-1]
    assert step == 1
    for key in ("val_acc", "val_asr", "val_ra", "test_acc", "test_asr", "test_ra"):
        assert 0.0 <= metrics[key] <= 1.0
    assert backdoor.data.poison_flags.any()
    assert len(backdoor.seeds) == 4
    # The poison count is reported with every step, so a run that poisoned nothing is visible in its metrics.
    assert metrics["poison_count"] == backdoor.metrics["poison_count"] == int(backdoor.data.poison_flags.sum())
    if name == "cl":
        assert 0.0 <= metrics["cl_hardened_clean_acc"] <= 1.0


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_runs_one_attack_step(name):
    spec = get_method("badnets")
    ctx = LocalContext(data_config=DataConfig(train_limit=16, test_limit=16, val_fraction=0.02))
    backdoor = spec.run(ctx, spec.make_config({**TINY, "model": name, "batch_size": 16}))
    assert backdoor.model_name == name and ctx.reports


def test_backdoor_round_trips_through_safetensors(tmp_path, badnets_backdoor):
    badnets_backdoor.save(tmp_path)
    loaded = Backdoor.load(tmp_path)
    model = loaded.build_model()
    again = evaluate(model, loaded.data)
    for key in ("test_acc", "test_asr", "val_acc", "val_asr"):
        assert again[key] == pytest.approx(badnets_backdoor.metrics[key])
    assert torch.equal(loaded.data.poison_flags, badnets_backdoor.data.poison_flags.cpu())
    assert loaded.seeds == badnets_backdoor.seeds


# The short synthetic schedule of the slow tests: small_cnn, 8 epochs on 4,000 images.
SYNTHETIC_DATA = DataConfig(synthetic_train=4000, synthetic_test=1000)
SYNTHETIC_SCHEDULE = dict(epochs=8, lr=0.05)


def train_synthetic(name: str, **settings) -> Backdoor:
    """conftest's cache, on the synthetic data of the slow tests."""
    return train_backdoor(name, data_config=SYNTHETIC_DATA, **settings)


# Both tests train synthetic's clean badnets recipe; conftest's cache holds it per xdist worker, so they share one
# worker and the model is trained once (about 40 s of a 2-core runner).
SYNTHETIC_GROUP = pytest.mark.xdist_group("synthetic-small-cnn")


@pytest.mark.slow
@SYNTHETIC_GROUP
def test_synthetic_is_learnable_by_a_small_cnn_without_saturating():
    started = time.perf_counter()
    settings = {**preset_settings("badnets", TUNED_SEED, dataset="synthetic", poison_rate=0.0), **SYNTHETIC_SCHEDULE}
    backdoor = train_synthetic("badnets", **settings)
    acc = backdoor.metrics["test_acc"]
    print(f"synthetic clean training: {time.perf_counter() - started:.1f}s, test_acc {acc:.3f}")
    # The default difficulty is calibrated to land here: well above chance (0.1), and far enough below 1.0 that
    # the few points of accuracy a defense costs can be seen.
    assert 0.80 <= acc <= 0.95


# ------------------------------------------------------------------------------------------- the attack matrix
# Presets were chosen on seed 0's validation split (each preset file says how); seed 3 never took part in
# choosing, so passing on it shows the preset implants rather than fits one split.
TUNED_SEED, UNSEEN_SEED = 0, 3
MIN_ASR, MAX_ACC_DROP = 0.90, 0.02


def matrix_attack_values(study: Path) -> dict[str, dict]:
    """The attack values a study file sets beside an attack's name (the digits matrix's stronger clean-label
    attacks), so this test trains exactly what the matrix trains."""
    listed = yaml.safe_load(study.read_text())["attacks"]
    return {item.pop("name"): item for item in (dict(entry) for entry in listed if isinstance(entry, dict))}


# SIG and CL do not implant on digits in their papers' range (at most half the target class, test trigger at
# most 1.5x the training one); the digits matrix runs them with stronger values and marks their rows.
BEYOND_PAPERS_ON_DIGITS = matrix_attack_values(ROOT / "examples" / "study-matrix-digits.yaml")


def preset_settings(name: str, seed: int, dataset: str = "digits", model: str = "small_cnn", **overrides) -> dict:
    """The attack config `bdo attack NAME --seed SEED` would run (defaults, then the dataset's preset, then
    `overrides`), reduced to the values that differ from the defaults plus the keys conftest's cache always
    names, so identical runs share one trained model with the other tests. Digits needs a preset for every
    attack (the paper's 100-epoch schedule is far too long there); synthetic has them only where needed."""
    # The orchestrator's own resolver, so the test runs exactly what `bdo attack NAME` runs; a box with torch
    # alone (make test-gpu) skips these tests instead of the whole module.
    resolve = pytest.importorskip("orchestrator.resolve", reason="presets are resolved by the orchestrator package")
    path = resolve.preset_path(dataset, name)
    assert dataset != "digits" or path.is_file(), f"{name} has no digits preset ({path}); a new attack needs one"
    full = resolve.resolve_attack_config(name, dataset, model, seed, overrides, use_preset=True)
    defaults = get_method(name).config_cls().to_dict()
    return {k: v for k, v in full.items() if k in DIGITS_ATTACK or v != defaults[k]}


def implant_shortfall(
    name: str, m: dict, clean: dict, max_drop: float = MAX_ACC_DROP, min_asr: float = MIN_ASR
) -> str | None:
    """Prints the attack's figures; returns what falls short of the bar (None when it implants)."""
    print(
        f"{name}: test_acc {m['test_acc']:.3f} (clean {clean['test_acc']:.3f}), test_asr {m['test_asr']:.3f}, "
        f"poison_count {m['poison_count']:.0f}"
    )
    if m["poison_count"] == 0:
        return f"{name}: nothing poisoned"
    if m["test_asr"] < min_asr:
        return f"{name}: test ASR {m['test_asr']:.3f} < {min_asr}"
    if m["test_acc"] < clean["test_acc"] - max_drop:
        return (
            f"{name}: test ACC {m['test_acc']:.3f} is more than {max_drop} below clean training "
            f"({clean['test_acc']:.3f})"
        )
    return None


def assert_implants(name: str, m: dict, clean: dict, min_asr: float = MIN_ASR) -> None:
    shortfall = implant_shortfall(name, m, clean, min_asr=min_asr)
    assert shortfall is None, shortfall


@pytest.mark.parametrize("seed", [TUNED_SEED, pytest.param(UNSEEN_SEED, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", method_names("attack"))
def test_every_attack_implants_with_its_digits_preset(name, seed):
    settings = preset_settings(name, seed)
    backdoor = train_backdoor(name, **settings)
    # Clean training is the same recipe (augmentation included) with nothing poisoned.
    clean = train_backdoor(name, **{**settings, "poison_rate": 0.0})
    assert clean.metrics["poison_count"] == 0
    if name not in BEYOND_PAPERS_ON_DIGITS:
        assert_implants(name, backdoor.metrics, clean.metrics)
        return
    # In its papers' range the attack stays below the bar on digits, as docs/results/digits.md says. The digits
    # matrix runs it with its study's stronger values instead, held to no bar there: whether those implant depends
    # on the CPU (CL's reached test ASR 0.97 on seed 0 where the matrix ran, 0.71 on an AMD EPYC), so what is held
    # is that the run reports them as outside the papers' range.
    assert backdoor.metrics["papers_regime"] == 1.0 and backdoor.metrics["test_asr"] < MIN_ASR, backdoor.metrics
    stronger = get_method(name).make_config(preset_settings(name, seed, **BEYOND_PAPERS_ON_DIGITS[name]))
    assert stronger.departures_from_papers(), f"{name}: the matrix's stronger values lie inside the papers' range"


def test_badnets_all2all_on_digits():
    # Every class must learn to move to the next one through one trigger: with the preset's 15 epochs that reached
    # val ASR 0.789 (test 0.702); 30 epochs at the same 10% reach val ASR 0.956 at val ACC 0.994 (seed 0).
    settings = preset_settings("badnets", TUNED_SEED, label_mode="all2all", epochs=30)
    m = train_backdoor("badnets", **settings).metrics
    clean = train_backdoor("badnets", **{**settings, "poison_rate": 0.0}).metrics
    # Every class moves to the next one through one trigger: harder than all2one (the paper's CIFAR figure is
    # 88%), so the bar is 0.80.
    assert_implants("badnets all2all", m, clean, min_asr=0.80)


def test_blend_with_a_user_trigger_file(tmp_path):
    from PIL import Image

    from methods.attacks.triggers import blend

    # A user's own pattern: diagonal stripes, saved as a PNG the attack must read, resize and blend in.
    rows, cols = torch.meshgrid(torch.arange(24), torch.arange(24), indexing="ij")
    stripes = (((rows + cols) // 3) % 2 * 255).to(torch.uint8)
    path = tmp_path / "my_trigger.png"
    Image.fromarray(stripes.numpy()).save(path)
    settings = preset_settings("blend", TUNED_SEED, pattern="file", pattern_file=str(path))
    backdoor = train_backdoor("blend", **settings)
    data = backdoor.data
    pattern = data.trigger.tensors["pattern"]
    assert pattern.shape == (1, 16, 16) and len(pattern.unique()) > 2  # resized from 24 px, so grey edges
    flags = data.poison_flags.cpu()
    clean_x = load_splits("digits", backdoor.seeds["split_seed"]).x_train
    assert torch.equal(data.x_train.cpu()[flags], blend(clean_x[flags], pattern, data.trigger.params["alpha"]))
    clean = train_backdoor("blend", **{**preset_settings("blend", TUNED_SEED), "poison_rate": 0.0})
    assert_implants("blend (file trigger)", backdoor.metrics, clean.metrics)


# On synthetic's short schedule (8 epochs, test ACC ~0.87 on 1,000 images) two trainings of the same recipe differ by
# a point or two with the float rounding of the CPU and thread count: Blend lost 2.1 points on one xdist worker (one
# thread) of an AMD EPYC and passed with two threads. As for the digits defenses (tests/conftest.py), the ACC bar is
# held on the mean over the attacks, with a cap per attack; ASR in every cell.
SYNTHETIC_MAX_CELL_ACC_DROP = 0.03


@pytest.mark.slow
@SYNTHETIC_GROUP
def test_attacks_implant_on_synthetic_with_small_cnn():
    drops, failures = {}, []
    for name in ["badnets", "blend", "sig", "wanet"]:
        # SIG's synthetic preset (half the class, the papers' test amplitude 60) reaches val ASR 0.73 in this short
        # schedule; the implant check uses the stronger test signal (100) and expects it reported as outside.
        stronger = {"amplitude_test": 100.0} if name == "sig" else {}
        settings = {**preset_settings(name, TUNED_SEED, dataset="synthetic", **stronger), **SYNTHETIC_SCHEDULE}
        backdoor = train_synthetic(name, **settings)
        clean = train_synthetic(name, **{**settings, "poison_rate": 0.0})
        if stronger:
            assert backdoor.metrics["papers_regime"] == 0.0
        drops[name] = clean.metrics["test_acc"] - backdoor.metrics["test_acc"]
        shortfall = implant_shortfall(
            f"{name} synthetic", backdoor.metrics, clean.metrics, max_drop=SYNTHETIC_MAX_CELL_ACC_DROP
        )
        failures += [shortfall] if shortfall else []
    mean = sum(drops.values()) / len(drops)
    if mean > MAX_ACC_DROP:
        failures.append(f"mean ACC lost {mean:.3f} > {MAX_ACC_DROP}")
    assert not failures, "; ".join(failures)


def test_cl_reduced_amplitude_stamps_part_of_the_trigger_in_training_and_all_of_it_at_test():
    spec = get_method("cl")
    # eps 0: the hardening leaves the images as they are, so the stamped pixels can be computed exactly.
    cfg = spec.make_config(
        {**TINY, "clean_epochs": 1, "pgd_eps": 0.0, "pgd_steps": 0, "poison_rate": 0.5, "trigger_amplitude": 0.5}
    )
    backdoor = spec.run(LocalContext(data_config=DataConfig(train_limit=300)), cfg)
    data, flags = backdoor.data, backdoor.data.poison_flags.cpu()
    mask, pattern = data.trigger.tensors["mask"], data.trigger.tensors["pattern"]
    original = load_splits("digits", backdoor.seeds["split_seed"], cfg=DataConfig(train_limit=300)).x_train[flags]
    expected = torch.where(
        mask, (original.float() + 0.5 * (pattern.float() - original.float())).round(), original.float()
    ).to(torch.uint8)
    assert flags.any() and torch.equal(data.x_train.cpu()[flags], expected)
    triggered, _, _ = data.backdoor_set("test")
    assert (triggered[:, mask.expand_as(pattern)] == pattern[mask.expand_as(pattern)]).all()
