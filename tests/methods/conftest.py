"""What the registry-wide method tests share: a method's tiny config (its search space's fixed and quick blocks, every
length count cut to at most 2) and the tiny backdoored model the defenses start from."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from methods.attacks.base import Backdoor
from methods.core.context import LocalContext
from methods.core.method import get_method
from methods.data.base import DataConfig

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"
TINY_DATA = DataConfig(train_limit=240, test_limit=200)
# Counts that set a run's length; each is cut to at most 2 where the config still validates.
LENGTH_WORDS = ("epoch", "round", "iterations", "n_steps", "draws", "pgd_steps", "adv_steps")


def quick_values(name: str) -> dict:
    """The method keys of its search space's fixed and quick blocks, quick last, as `bdo tune --quick` applies them
    (data.* keys are replaced by TINY_DATA)."""
    raw = yaml.safe_load((SPACES / f"{name}.yaml").read_text()) or {}
    merged = {**(raw.get("fixed") or {}), **(raw.get("quick") or {})}
    return {k: v for k, v in merged.items() if "." not in k}


def tiny_config(name: str, **overrides):
    spec = get_method(name)
    cfg = spec.make_config(quick_values(name))
    cut = True
    while cut:  # again after any cut: a count bound by another (adv_epochs <= epochs) is cut once that one is
        cut = False
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 2):
                continue
            if any(word in f.name for word in LENGTH_WORDS):
                try:
                    cfg, cut = spec.make_config({**cfg.to_dict(), f.name: 2}), True
                except ValueError:
                    pass  # a cross-field rule needs this count as it is
    return spec.make_config({**cfg.to_dict(), **overrides}) if overrides else cfg


@pytest.fixture(scope="session")
def tiny_backdoor() -> Backdoor:
    spec = get_method("badnets")
    cfg = spec.make_config(dict(dataset="digits", model="small_cnn", epochs=3, lr=0.05, poison_rate=0.1, seed=0))
    return spec.run(LocalContext(data_config=TINY_DATA), cfg)
