from __future__ import annotations

import pytest

from methods.attacks.badnets import BadNetsConfig
from methods.core.method import get_method, method_names
from methods.core.training import derive_seed


@pytest.mark.parametrize(
    "values, message",
    [
        ({"poison_rate": 1.5}, "poison_rate"),
        ({"poison_rate": -0.1}, "poison_rate"),
        ({"epochs": "ten"}, "epochs: expected int"),
        ({"label_mode": "one2all"}, "label_mode"),
        ({"dataset": "imagenet9"}, "dataset: unknown"),
        ({"model": "resnet9000"}, "model: unknown"),
        ({"pattern": "file"}, "patch_file"),
        ({"no_such_key": 1}, "unknown key"),
    ],
)
def test_bad_values_name_the_field(values, message):
    with pytest.raises(ValueError, match=message):
        BadNetsConfig.from_dict(values)


def test_ints_are_accepted_for_floats_and_bools_are_not_ints():
    assert BadNetsConfig(lr=1).lr == 1.0
    with pytest.raises(ValueError):
        BadNetsConfig(epochs=True)


@pytest.mark.parametrize("name", method_names())
def test_every_registered_method_has_a_valid_default_config(name):
    spec = get_method(name)
    cfg = spec.make_config()
    assert spec.kind in ("attack", "defense")
    assert type(cfg).from_dict(cfg.to_dict()) == cfg


def test_seeds_are_derived_stable_distinct_and_overridable():
    cfg = BadNetsConfig(seed=3)
    seeds = cfg.seeds()
    assert len(set(seeds.values())) == 4 and seeds == BadNetsConfig(seed=3).seeds()
    assert seeds != BadNetsConfig(seed=4).seeds()
    assert BadNetsConfig(seed=3, poison_seed=11).seeds()["poison_seed"] == 11
    assert seeds["train_seed"] == derive_seed(3, "train")
