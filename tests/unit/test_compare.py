"""The pieces of the blind-vs-oracle comparison that need no training (orchestrator/compare.py): the rank
correlation, the grouping of variants that chose the same run, and the table with its goal."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from orchestrator.compare import distinct_configs, render_comparison, spearman


@pytest.mark.parametrize(
    "xs, ys, expected",
    [
        ([1, 2, 3, 4], [10, 20, 30, 40], 1.0),
        ([1, 2, 3, 4], [4, 3, 2, 1], -1.0),
        ([1, 1, 2, 3], [1, 2, 3, 4], 0.9486832980505138),  # ties take their mean rank (scipy's value)
        ([1, 2, float("nan"), 3, 4], [1, 3, 0, 2, 4], 0.8),  # the pair with a NaN is left out
    ],
)
def test_spearman(xs, ys, expected):
    assert math.isclose(spearman(xs, ys), expected, abs_tol=1e-12)


@pytest.mark.parametrize("xs, ys", [([1, 2], [1, 2]), ([1, 1, 1], [1, 2, 3])])
def test_spearman_is_nan_without_enough_spread(xs, ys):
    assert math.isnan(spearman(xs, ys))


def entry(preset, blind, oracle, rho=None, trials=4):
    """A cell as collect_comparison returns it; each variant given as (acc, asr) per seed."""
    runs = {
        v: [(str(s), f"{v}{s}", {"acc": acc, "asr": asr}) for s, (acc, asr) in enumerate(pairs)]
        for v, pairs in (("preset", preset), ("blind", blind), ("oracle", oracle))
    }
    return {"runs": runs, "trials": trials, "rho": rho or {}}


def test_table_shows_each_variant_and_holds_the_goal_one_sided():
    collected = {
        "attacks": ["badnets"],
        "defenses": ["ft", "nad", "dbr"],
        "objective": "val_blind_score max",
        "cells": {
            # blind better than oracle on ASR, 1.5 points less accurate: within the goal
            ("badnets", "ft"): entry(
                [(0.9, 0.5)] * 2,
                [(0.95, 0.0), (0.96, 0.0)],
                [(0.97, 0.02)] * 2,
                {"val_adv_concentration": 0.8, "val_acc": -0.4},
            ),
            # 6 points of ASR above the oracle: outside
            ("badnets", "nad"): entry([(0.9, 0.5)] * 2, [(0.97, 0.08)] * 2, [(0.97, 0.02)] * 2),
            # 3 points of ACC below the oracle: outside
            ("badnets", "dbr"): entry([(0.9, 0.5)] * 2, [(0.94, 0.0)] * 2, [(0.97, 0.0)] * 2, trials=8),
        },
    }
    table = render_comparison(collected, "md")
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {r[1]: dict(zip(header, r)) for r in ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])}
    assert rows["ft"]["blind-tuned"] == "95.5±0.7 / 0.0±0.0" and rows["ft"]["oracle-tuned"] == "97.0±0.0 / 2.0±0.0"
    assert rows["ft"]["ASR blind - oracle"] == "-2.0" and rows["ft"]["ACC blind - oracle"] == "-1.5"
    assert [rows[d]["within goal"] for d in ("ft", "nad", "dbr")] == ["yes", "no", "no"]
    assert rows["ft"]["rho(adv. concentration, val ASR)"] == "+0.80" and rows["nad"]["rho(val ACC, val ASR)"] == "-"
    assert rows["dbr"]["trials"] == "8"
    assert "Defenses within the goal on every attack: 1 of 3 (ft)" in table
    raw = render_comparison(collected, "runs-csv").splitlines()
    assert raw[0] == "attack,defense,variant,seed,run_id,test_acc,test_asr" and len(raw) == 1 + 3 * 3 * 2


def test_variants_that_chose_the_same_run_share_it(monkeypatch):
    """The preset and a tuned choice equal to it are one run; under knowledge rules the level tells runs apart."""
    import orchestrator.compare as compare_module

    def fake_spec(plan, dataset, model, defense, attack, seed, chosen):
        return SimpleNamespace(config={"lr": 0.01, **chosen, "knowledge": plan.knowledge})

    monkeypatch.setattr(compare_module, "final_spec", fake_spec)
    blind, oracle = SimpleNamespace(knowledge="blind"), SimpleNamespace(knowledge="oracle")
    picks = {
        "preset": (blind, {}, {}),
        "blind": (blind, {"lr": 0.1}, {"selected_trial_id.blind": "b"}),
        "oracle": (oracle, {}, {"selected_trial_id.oracle": "o"}),
    }
    study = SimpleNamespace(seeds=[0], dataset="digits", model="small_cnn")
    shared = distinct_configs(study, picks, "badnets", "ft", shared=True)
    assert [variants for variants, _ in shared] == [["preset", "oracle"], ["blind"]]
    assert shared[0][1][2] == {"selected_trial_id.oracle": "o"}  # the merged run names the oracle's selected trial
    apart = distinct_configs(study, picks, "badnets", "dbr", shared=False)
    assert [variants for variants, _ in apart] == [["preset"], ["blind"], ["oracle"]]
