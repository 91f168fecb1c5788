"""The clean-label attacks' papers' range (SIG and CL: at most half the target class, a test trigger at most
1.5x the training one, CL's PGD radius at most 16/255): what a configuration outside it reports, and every
preset of every dataset and recipe inside it, so a preset never silently measures another attack."""

from __future__ import annotations

import pytest

from methods.core.method import get_method, method_names
from orchestrator.resolve import PRESETS, recipes, resolve_attack_config

DECLARED = [n for n in method_names("attack") if get_method(n).config_cls().departures_from_papers() is not None]


def departures(name: str, **values) -> list[str]:
    return get_method(name).make_config(values).departures_from_papers()


def test_sig_and_cl_declare_their_range_and_their_defaults_lie_inside_it():
    assert set(DECLARED) == {"sig", "cl"}
    assert departures("sig") == [] and departures("cl") == []


def test_each_departure_is_named_with_the_papers_value():
    assert departures("sig", poison_rate=0.5, amplitude_test=60.0) == []
    (share,) = departures("sig", poison_rate=0.9)
    assert "90% of the target class" in share and "at most 50%" in share
    (strength,) = departures("sig", amplitude=40.0, amplitude_test=100.0)
    assert "test amplitude 100" in strength and "60 against 40" in strength
    # the PBE code's dirty-label SIG is a papers' variant; its rate is a share of the whole set, not of a class
    assert departures("sig", label_mode="all2one", poison_rate=0.1) == []
    assert len(departures("cl", poison_rate=0.9, pgd_eps=32 / 255, trigger_amplitude=0.5)) == 3
    assert departures("cl", poison_rate=0.5, pgd_eps=16 / 255, trigger_amplitude=0.7) == []
    assert "PGD radius 32/255" in departures("cl", pgd_eps=32 / 255)[0]


def test_attacks_without_a_declared_range_report_none():
    assert get_method("badnets").make_config({"poison_rate": 0.9}).departures_from_papers() is None


DATASETS = sorted(p.name for p in PRESETS.iterdir() if p.is_dir())
CASES = [
    (name, dataset, recipe)
    for name in DECLARED
    for dataset in DATASETS
    for recipe in [None, *recipes(dataset)]
    if (PRESETS / dataset / (recipe or "") / f"{name}.yaml").is_file()
]


@pytest.mark.parametrize("name, dataset, recipe", CASES, ids=[f"{d}-{r or 'paper'}-{n}" for n, d, r in CASES])
def test_every_preset_lies_in_the_papers_range(name, dataset, recipe):
    values = resolve_attack_config(name, dataset, "small_cnn", 0, {}, True, recipe=recipe, check_files=False)
    assert departures(name, **values) == [], f"{dataset} {recipe or ''} {name} preset: outside the papers' range"
