"""The constrained objective (orchestrator/objective.py): the scalar Tune sees, the selection rule, the parsing and
validation of `subject_to`, and its place in the knowledge check. Torch-free and Ray-free."""

from __future__ import annotations

import math

import pytest

from methods.core.knowledge import knowledge_of
from orchestrator.cli import main
from orchestrator.errors import BadInput
from orchestrator.objective import (
    INFEASIBLE,
    OBJECTIVE_METRIC,
    UNSCORED,
    TrialObjective,
    objective_value,
    select,
    violation,
)
from orchestrator.resolve import SEARCH_SPACES
from orchestrator.runner import best_trial
from orchestrator.spaces import load_space, plan_sweep

BAR = {"val_acc_drop": 0.02}


def trial(tid: str, asr: float, drop: float, error: bool = False) -> dict:
    return {"trial_id": tid, "val_asr": asr, "val_acc_drop": drop, "error": error, "config": {}}


# --- the scalar ---


def test_feasible_reports_score_the_metric_and_infeasible_ones_pay_past_every_feasible_one():
    assert objective_value({"val_asr": 0.04, "val_acc_drop": 0.01}, "val_asr", "min", BAR) == pytest.approx(0.04)
    # a worse ASR that is feasible beats a perfect ASR that lost 2.5 points
    worst_feasible = objective_value({"val_asr": 1.0, "val_acc_drop": 0.02}, "val_asr", "min", BAR)
    best_infeasible = objective_value({"val_asr": 0.0, "val_acc_drop": 0.025}, "val_asr", "min", BAR)
    assert worst_feasible == pytest.approx(1.0) and best_infeasible == pytest.approx(INFEASIBLE * 1.005)
    assert worst_feasible < best_infeasible
    # infeasible ones rank by their distance from feasibility first
    near = objective_value({"val_asr": 0.9, "val_acc_drop": 0.03}, "val_asr", "min", BAR)
    far = objective_value({"val_asr": 0.0, "val_acc_drop": 0.05}, "val_asr", "min", BAR)
    assert best_infeasible < near < far


def test_the_scalar_is_always_minimised_and_nan_scores_last():
    # mode max is negated: a higher val_der scores lower
    assert objective_value({"val_der": 0.9, "val_acc_drop": 0.0}, "val_der", "max", BAR) == pytest.approx(-0.9)
    assert objective_value({"val_asr": math.nan, "val_acc_drop": 0.0}, "val_asr", "min", BAR) == UNSCORED
    assert objective_value({"val_asr": 0.1, "val_acc_drop": math.nan}, "val_asr", "min", BAR) == UNSCORED
    assert objective_value({"val_asr": 0.1}, "val_asr", "min", BAR) == UNSCORED  # the constraint never reported
    assert UNSCORED > objective_value({"val_asr": 1.0, "val_acc_drop": 1.0}, "val_asr", "min", BAR)


def test_a_drop_of_exactly_the_bound_is_feasible_despite_float_rounding():
    drop = 0.97 - 0.95  # 0.020000000000000018
    assert drop > 0.02 and violation({"val_acc_drop": drop}, BAR) == 0


def test_the_trial_adds_the_drop_and_the_scalar_to_each_report():
    derive = TrialObjective(0.95, "val_asr", "min", BAR)
    out = derive({"val_acc": 0.90, "val_asr": 0.01})
    assert out["val_acc_drop"] == pytest.approx(0.05)
    assert out[OBJECTIVE_METRIC] == pytest.approx(0.01 + INFEASIBLE * 1.03)
    assert derive({"train_loss": 0.3}) == {}  # a step that evaluates nothing: no scalar (schedulers skip it)
    # an unconstrained sweep still records the drop, and Tune keeps reading the metric itself
    assert TrialObjective(0.95, "val_der", "max")({"val_acc": 0.96, "val_der": 0.7}) == {
        "val_acc_drop": pytest.approx(-0.01)
    }


# --- selection ---


def test_the_best_feasible_trial_beats_an_infeasible_one_with_a_better_metric():
    trials = [trial("a", 0.00, 0.10), trial("b", 0.30, 0.01), trial("c", 0.10, 0.02), trial("d", 0.0, 0.0, True)]
    best, feasible = select(trials, "val_asr", "min", BAR)
    assert best["trial_id"] == "c" and feasible
    assert best_trial(trials, "val_asr", "min", BAR)["trial_id"] == "c"


def test_without_a_feasible_trial_the_closest_is_selected_and_flagged():
    trials = [trial("a", 0.00, 0.10), trial("b", 0.50, 0.03), trial("c", 0.20, 0.03)]
    best, feasible = select(trials, "val_asr", "min", BAR)
    assert best["trial_id"] == "c" and not feasible  # the smallest violation, ties on the better ASR


def test_a_nan_metric_or_constraint_never_beats_numbers():
    trials = [trial("nan-asr", math.nan, 0.0), trial("nan-drop", 0.0, math.nan), trial("far", 0.9, 0.5)]
    best, feasible = select(trials, "val_asr", "min", BAR)
    assert best["trial_id"] == "far" and not feasible
    # with nothing but a NaN constraint left, the metric still picks (flagged); a NaN metric is never picked
    assert select(trials[:2], "val_asr", "min", BAR) == (trials[1], False)
    assert select(trials[:1], "val_asr", "min", BAR) == (None, False)


def test_ties_go_to_the_earlier_trial_and_unconstrained_selection_is_unchanged():
    trials = [trial("a", 0.1, 0.0), trial("b", 0.1, 0.0)]
    assert select(trials, "val_asr", "min", BAR)[0]["trial_id"] == "a"
    rows = [
        {"trial_id": "x", "val_der": 0.6, "error": False},
        {"trial_id": "y", "val_der": 0.8, "error": False},
        {"trial_id": "z", "val_der": math.nan, "error": False},
    ]
    assert best_trial(rows, "val_der", "max")["trial_id"] == "y"
    assert select(rows, "val_der", "max") == (rows[1], True)


# --- the spaces ---


def test_every_defense_space_but_sd_is_held_to_the_bar_and_attacks_are_not():
    for name in ("aft", "argd", "asd", "dbr", "dst", "ft", "nad", "pbe"):
        plan = plan_sweep(load_space(SEARCH_SPACES / f"{name}.yaml"))
        assert (plan.space.metric, plan.space.mode, plan.constraints) == ("val_asr", "min", BAR), name
        assert (plan.tune_metric, plan.tune_mode) == (OBJECTIVE_METRIC, "min")
        assert plan.objective_text == "min val_asr subject to val_acc_drop <= 0.02"
    assert load_space(SEARCH_SPACES / "sd.yaml").constraints == {}
    assert load_space(SEARCH_SPACES / "badnets.yaml").constraints == {}


def test_a_defense_space_without_an_objective_gets_the_bar_and_der_stays_an_option(tmp_path):
    path = tmp_path / "ft.yaml"
    path.write_text("method: ft\n")
    space = load_space(path)
    assert (space.metric, space.mode, space.constraints) == ("val_asr", "min", BAR)
    path.write_text("method: ft\nobjective: {metric: val_der, mode: max}\n")
    plan = plan_sweep(load_space(path))
    assert plan.constraints == {} and (plan.tune_metric, plan.tune_mode) == ("val_der", "max")
    path.write_text("method: badnets\n")
    assert load_space(path).metric == "val_der"  # an attack space's default is unchanged


@pytest.mark.parametrize(
    "objective, message",
    [
        ("{metric: val_asr, mode: min, subject_to: {val_acc_loss: 0.02}}", "unknown constraint 'val_acc_loss'"),
        ("{metric: val_asr, mode: min, subject_to: {val_acc_drop: two}}", "the bound 'two' is not a number"),
        ("{metric: val_asr, mode: min, subject_to: {val_acc_drop: true}}", "the bound True is not a number"),
        ("{metric: val_asr, mode: min, subject_to: {val_acc_drop: 2}}", "the bound 2 is outside [0, 1]"),
        ("{metric: val_asr, mode: min, subject_to: {val_acc_drop: -0.1}}", "the bound -0.1 is outside [0, 1]"),
        ("{metric: val_asr, mode: min, subject_to: {}}", "expected a mapping {NAME: BOUND}"),
        ("{metric: val_asr, mode: min, subject_to: [val_acc_drop]}", "expected a mapping {NAME: BOUND}"),
        ("{metric: val_asr, mode: min, subjet_to: {val_acc_drop: 0.02}}", "objective: unknown key(s) subjet_to"),
    ],
)
def test_bad_constraints_are_one_line(tmp_path, objective, message):
    path = tmp_path / "ft.yaml"
    path.write_text(f"method: ft\nobjective: {objective}\n")
    with pytest.raises(BadInput, match=None) as caught:
        load_space(path)
    assert message in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def test_an_attack_space_takes_no_constraint(tmp_path):
    path = tmp_path / "badnets.yaml"
    path.write_text("method: badnets\nobjective: {metric: val_asr, mode: max, subject_to: {val_acc_drop: 0.02}}\n")
    with pytest.raises(BadInput, match="badnets is an attack"):
        load_space(path)


def test_a_pareto_objective_replaces_the_constrained_one(tmp_path, capsys):
    plan = plan_sweep(load_space(SEARCH_SPACES / "ft.yaml"), objective="pareto", scheduler="fifo")
    assert plan.constraints == {} and plan.tune_metric == plan.space.metric
    assert sorted(plan.objective_metrics) == ["val_acc", "val_asr"]
    assert (
        main(["tune", str(SEARCH_SPACES / "ft.yaml"), "--objective", "pareto", "--scheduler", "fifo", "--dry-run"]) == 0
    )


# --- knowledge ---


def test_the_accuracy_constraint_is_blind_so_a_blind_sweep_may_carry_it(tmp_path):
    assert knowledge_of("val_acc_drop") == "blind"
    assert knowledge_of("val_asr") == "oracle" and knowledge_of("val_blind_score") == "blind"
    path = tmp_path / "ft.yaml"
    path.write_text(
        "method: ft\nknowledge: blind\n"
        "objective: {metric: val_blind_score, mode: max, subject_to: {val_acc_drop: 0.02}}\n"
    )
    plan = plan_sweep(load_space(path))
    assert plan.knowledge == "blind" and plan.objective_metrics == ["val_blind_score", "val_acc_drop"]
    # the oracle default is refused under blind on its metric, not on the constraint
    with pytest.raises(BadInput, match="objective.metric val_asr needs the trigger"):
        plan_sweep(load_space(SEARCH_SPACES / "ft.yaml"), knowledge="blind")
