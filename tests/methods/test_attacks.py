"""Attacks on real training: every attack runs, BadNets implants its backdoor, and runs resume bit-identically."""
from __future__ import annotations

import time

import pytest
import torch

from methods.attacks.base import Backdoor, evaluate
from methods.core.context import LocalContext, StopRun
from methods.core.method import get_method, method_names
from methods.data.base import DataConfig, load_splits
from methods.models.base import build_model
from tests.conftest import backdoor_train_seconds, train_backdoor

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


@pytest.mark.parametrize("name", ["small_cnn", "wrn16_1", "preact_resnet18", "resnet18", "wrn40_2", "vgg16_bn"])
def test_every_model_runs_one_attack_step(name):
    spec = get_method("badnets")
    ctx = LocalContext(data_config=DataConfig(train_limit=16, test_limit=16, val_fraction=0.02))
    backdoor = spec.run(ctx, spec.make_config({**TINY, "model": name, "batch_size": 16}))
    assert backdoor.model_name == name and ctx.reports


def test_badnets_all2one_on_digits_implants_the_backdoor():
    backdoor = train_backdoor("badnets")
    m = backdoor.metrics
    print(f"badnets digits: {backdoor_train_seconds('badnets'):.1f}s, test_acc {m['test_acc']:.3f}, test_asr {m['test_asr']:.3f}")
    assert m["test_acc"] >= 0.95 and m["test_asr"] >= 0.95


def test_blend_all2one_on_digits_implants_the_backdoor():
    m = train_backdoor("blend").metrics
    assert m["test_acc"] >= 0.95 and m["test_asr"] >= 0.9


def test_interrupted_attack_resumes_bit_identically():
    spec = get_method("badnets")
    cfg = spec.make_config(dict(TINY, epochs=4, batch_size=128))
    data_cfg = DataConfig(train_limit=400)
    straight = spec.run(LocalContext(data_config=data_cfg), cfg)

    interrupted = LocalContext(data_config=data_cfg, stop_after_step=2)
    with pytest.raises(StopRun):
        spec.run(interrupted, cfg)
    assert [s for s, _ in interrupted.reports] == [1, 2]
    resumed_ctx = LocalContext(data_config=data_cfg, checkpoint=interrupted.checkpoint)
    resumed = spec.run(resumed_ctx, cfg)
    assert [s for s, _ in resumed_ctx.reports] == [3, 4]
    for key, value in straight.model_state.items():
        assert torch.equal(value, resumed.model_state[key]), key


def test_backdoor_round_trips_through_safetensors(tmp_path, badnets_backdoor):
    badnets_backdoor.save(tmp_path)
    loaded = Backdoor.load(tmp_path)
    model = loaded.build_model()
    again = evaluate(model, loaded.data)
    for key in ("test_acc", "test_asr", "val_acc", "val_asr"):
        assert again[key] == pytest.approx(badnets_backdoor.metrics[key])
    assert torch.equal(loaded.data.poison_flags, badnets_backdoor.data.poison_flags.cpu())
    assert loaded.seeds == badnets_backdoor.seeds


@pytest.mark.slow
def test_synthetic_is_learnable_by_a_small_cnn():
    from methods.attacks.badnets import BadNetsConfig

    spec = get_method("badnets")
    ctx = LocalContext(data_config=DataConfig(synthetic_train=4000, synthetic_test=1000))
    started = time.perf_counter()
    backdoor = spec.run(ctx, BadNetsConfig(dataset="synthetic", poison_rate=0.0, epochs=8, lr=0.05))
    print(f"synthetic clean training: {time.perf_counter() - started:.1f}s, test_acc {backdoor.metrics['test_acc']:.3f}")
    assert backdoor.metrics["test_acc"] >= 0.9
