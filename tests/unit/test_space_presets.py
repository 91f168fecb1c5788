"""A sweep's first trial is the untuned configuration (the dataset's preset, else the defaults) only when that point
lies inside the space; otherwise every trial is sampled and the selected one can score below not tuning at all
(the demo's PBE sweep did: both sampled trials kept the backdoor while the preset removes it). Every registered
space must contain its own dataset's presets."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.spaces import default_point, load_space, plan_sweep

SPACES = sorted((Path(__file__).resolve().parents[2] / "search_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SPACES, ids=[p.stem for p in SPACES])
def test_the_first_trial_is_the_preset(path):
    space = load_space(path)
    plan = plan_sweep(space, seed=0)
    outside = {d.key: plan.base.config.get(d.key) for d in plan.tuned if not d.contains(plan.base.config.get(d.key))}
    assert not outside, f"{path.name}: the {plan.base.dataset} preset/defaults lie outside the space: {outside}"
    assert default_point(plan) is not None
