"""The paper table's layout rules, on hand-made cells: the study's own order of rows and columns, and "-" for a
metric a column cannot have."""

from __future__ import annotations

import math

from orchestrator.tables import in_order, mean_std, render


def test_the_studys_order_wins_and_unknown_names_follow_alphabetically():
    assert in_order({"nad", "ft", "zeta", "alpha"}, ["nad", "dbr", "ft"]) == ["nad", "ft", "alpha", "zeta"]
    assert in_order({"b", "a"}, []) == ["a", "b"]


def test_a_metric_without_values_is_a_dash_not_nan():
    cells = {
        ("badnets", "no defense"): {
            "seeds": 2,
            "trials": 0,
            "acc": mean_std([0.98, 0.99]),
            "der": mean_std([math.nan, math.nan]),
        },
        ("badnets", "pbe"): {"seeds": 2, "trials": 3, "acc": mean_std([0.97, 0.95]), "der": mean_std([0.9, 1.0])},
    }
    table = render(["badnets"], ["no defense", "pbe"], cells, ["acc", "der"], "md")
    row = next(line for line in table.splitlines() if line.startswith("| badnets"))
    assert row == "| badnets | 98.5±0.7 / - (seeds 2) | 96.0±1.4 / 95.0±7.1 (seeds 2, trials 3) |", row
    assert "nan" not in table


def test_an_attack_outside_its_papers_range_is_marked_with_a_note():
    cell = {"seeds": 2, "trials": 0, "acc": mean_std([0.98, 0.99]), "asr": mean_std([1.0, 1.0])}
    cells = {
        ("sig", "no defense"): {**cell, "outside_papers": True},
        ("sig", "ft"): cell,
        ("badnets", "no defense"): {**cell, "outside_papers": False},
        ("badnets", "ft"): cell,
    }
    table = render(["badnets", "sig"], ["no defense", "ft"], cells, ["acc", "asr"], "md")
    rows = [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ")][1:]
    assert rows == ["| badnets", "| sig*"], rows
    assert "* not the papers' attack" in table
    assert "not the papers' attack" not in render(["badnets"], ["no defense", "ft"], cells, ["acc", "asr"], "md")
