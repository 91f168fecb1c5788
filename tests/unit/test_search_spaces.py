"""Every registered method has a search space; every space and preset in the repo validates."""

from __future__ import annotations

import pytest
import yaml

from methods.core.method import METHODS, method_names
from orchestrator.errors import BadInput
from orchestrator.resolve import PRESETS, SEARCH_SPACES, build_config
from orchestrator.spaces import default_point, load_space, plan_sweep, trial_values

SPACE_FILES = sorted(SEARCH_SPACES.glob("*.yaml"))
PRESET_FILES = sorted(PRESETS.glob("*/*.yaml"))


@pytest.mark.parametrize("name", method_names())
def test_every_registered_method_has_a_search_space_with_a_quick_block(name):
    path = SEARCH_SPACES / f"{name}.yaml"
    assert path.is_file(), f"{name} needs search_spaces/{name}.yaml"
    space = load_space(path)
    assert space.method == name and space.quick, "a quick: block keeps demos and tests small"


@pytest.mark.parametrize("path", SPACE_FILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("quick", [False, True])
def test_space_validates_and_samples_valid_configs(path, quick):
    space = load_space(path)
    plan = plan_sweep(space, quick=quick)
    assert plan.space.metric.startswith("val_")
    cls = METHODS.get(space.method).config_cls
    for d in plan.tuned:  # each extreme value of each dimension gives a valid config with derived keys filled
        for value in d.samples():
            build_config(cls, trial_values(plan, {d.key: value}), str(path))


@pytest.mark.parametrize("path", PRESET_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_presets_are_flat_mappings_of_valid_values(path):
    values = yaml.safe_load(path.read_text())
    method = path.stem
    assert method in METHODS, f"preset for an unregistered method {method}"
    assert isinstance(values, dict) and all(not isinstance(v, dict) for v in values.values())
    cls = METHODS.get(method).config_cls
    own = {k: v for k, v in values.items() if "." not in k}
    build_config(cls, own, str(path))


def test_a_set_pins_a_searched_key():
    space = load_space(SEARCH_SPACES / "badnets.yaml")
    plan = plan_sweep(space, sets={"lr": 0.02})
    assert "lr" not in {d.key for d in plan.tuned} and plan.base.config["lr"] == 0.02


def test_derived_values_follow_their_source(tmp_path):
    path = tmp_path / "cl.yaml"
    path.write_text(
        "method: cl\nspace:\n  pgd_eps: {choice: [0.04, 0.08]}\n  pgd_step_size: {derived: 'pgd_eps / 4'}\n"
    )
    plan = plan_sweep(load_space(path))
    assert trial_values(plan, {"pgd_eps": 0.08})["pgd_step_size"] == pytest.approx(0.02)


def test_grid_searcher_refuses_continuous_dimensions():
    with pytest.raises(BadInput, match="searcher grid"):
        plan_sweep(load_space(SEARCH_SPACES / "badnets.yaml"), searcher="grid")


def test_first_trial_runs_the_untuned_values_when_they_lie_in_the_space():
    space = load_space(SEARCH_SPACES / "argd.yaml")
    plan = plan_sweep(space, dataset="digits")
    point = default_point(plan)
    assert point is not None and set(point) == {d.key for d in plan.tuned}
    assert point["w_vert"] == 0.03 and point["teacher_epochs"] == 30, "the digits preset, not the paper's values"
    assert all(point[k] == plan.base.config[k] for k in point)
    assert default_point(plan_sweep(space, dataset="digits", default_trial=False)) is None


def test_no_first_point_outside_the_space_or_for_grids(tmp_path):
    path = tmp_path / "ft.yaml"
    path.write_text("method: ft\nspace:\n  lr: {loguniform: [0.2, 0.5]}\n")
    assert default_point(plan_sweep(load_space(path), dataset="digits", use_preset=False)) is None
    path.write_text("method: ft\nspace:\n  lr: {grid: [0.01, 0.05]}\n")
    assert default_point(plan_sweep(load_space(path), dataset="digits")) is None


def test_knowledge_comes_from_the_space_and_the_command_line_wins(tmp_path):
    from orchestrator.discover import plan_text

    path = tmp_path / "ft.yaml"
    path.write_text("method: ft\nknowledge: blind\nobjective: {metric: val_acc, mode: max}\n")
    blind = plan_sweep(load_space(path))
    assert blind.knowledge == "blind" and blind.base.config["knowledge"] == "blind"  # the in-method rules follow
    assert yaml.safe_load(plan_text([blind], {}))["search"]["knowledge"] == "blind"  # what --dry-run shows
    assert plan_sweep(load_space(path), knowledge="oracle").knowledge == "oracle"
    assert plan_sweep(load_space(SEARCH_SPACES / "ft.yaml")).knowledge == "oracle"  # today's behaviour
    with pytest.raises(BadInput, match="objective.metric val_asr needs the trigger or the poison flags"):
        plan_sweep(load_space(SEARCH_SPACES / "ft.yaml"), knowledge="blind")
    with pytest.raises(BadInput, match="--set knowledge=oracle: the sweep selects under knowledge blind"):
        plan_sweep(load_space(path), sets={"knowledge": "oracle"})


def test_a_blind_sweep_may_select_on_the_blind_signals(tmp_path):
    path = tmp_path / "ft.yaml"
    for metric, fixed, mode in (
        ("val_adv_concentration", "", "min"),
        ("val_canary_asr", "fixed: {canary_rate: 0.1}\n", "min"),
        ("val_blind_score", "", "max"),
    ):  # val_acc - val_adv_concentration
        path.write_text(f"method: ft\nknowledge: blind\n{fixed}objective: {{metric: {metric}, mode: {mode}}}\n")
        assert plan_sweep(load_space(path)).knowledge == "blind"
    path.write_text("method: ft\nknowledge: blind\nobjective: {metric: val_canary_asr, mode: min}\n")
    with pytest.raises(BadInput, match="val_canary_asr is reported only by runs that plant a canary"):
        plan_sweep(load_space(path))
    path.write_text("method: ft\nknowledge: blind\nobjective: {metric: val_asr, mode: min}\n")
    with pytest.raises(BadInput, match="val_asr needs the trigger or the poison flags.*val_adv_concentration"):
        plan_sweep(load_space(path))
