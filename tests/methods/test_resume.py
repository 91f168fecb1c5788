"""Every registered method resumes bit-identically: a run stopped after step k and resumed from its checkpoint
ends with the weights of an uninterrupted run, having made the same reports and hand-offs, for k at the first,
middle and last step of every stage (so at the first step of each later stage and right after each stage closes).
A run stops right after a checkpoint (LocalContext's stop_after_step), so the checkpoint an uninterrupted run took
after step k is the one an interrupted run leaves: every resume here starts from those, one run per method.
Parametrised over the registry at the tiny size of test_every_method.py; a method's other training paths (a rerun,
another teacher or scoring model) are resumed too, as named in OTHER_PATHS."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from methods.core.context import LocalContext
from methods.core.fastpath import FastPath
from methods.core.method import get_method, method_names
from tests.methods.conftest import TINY_DATA, tiny_config

PLAIN = FastPath(bf16=False, channels_last=False, cudnn_benchmark=False)
# Config values that send a method down a path with other stages or a varying length.
OTHER_PATHS = {
    "argd": [{"teacher_mode": "scratch_wrn40_2"}],
    "dbr": [{"fct_model": "backdoored", "br_acc_reference": "suspect"}],  # the cifar10 cpu recipe's path
    "dst": [{"fct_model": "backdoored"}],
    "pbe": [{"step0_retries": 1, "step0_max_val_asr": 0.0}],  # step 0 fails and is rerun: the run grows
}
CASES = [(name, {}) for name in method_names()] + [(n, v) for n, paths in OTHER_PATHS.items() for v in paths]


class Recording(LocalContext):
    """Keeps the stage and the checkpoint of every step."""

    def save_state(self, state):
        super().save_state(state)
        self.__dict__.setdefault("stages", {})[state["step"]] = state["extra"]["stage"]
        self.__dict__.setdefault("checkpoints", {})[state["step"]] = self.checkpoint


def stop_points(stages: dict[int, str]) -> list[int]:
    """The first, middle and last step of every stage."""
    spans: dict[str, list[int]] = {}
    for step in sorted(stages):
        spans.setdefault(stages[step], []).append(step)
    return sorted({p for steps in spans.values() for p in (steps[0], steps[len(steps) // 2], steps[-1])})


def assert_same_handoffs(a: LocalContext, b: LocalContext) -> None:
    assert sorted(a.hand_offs) == sorted(b.hand_offs)
    for name, table in a.hand_offs.items():
        assert sorted(table) == sorted(b.hand_offs[name])
        for column, values in table.items():
            np.testing.assert_array_equal(values, b.hand_offs[name][column], err_msg=f"{name}.{column}")
    assert a.series == b.series


def test_other_paths_name_registered_methods():
    assert set(OTHER_PATHS) <= set(method_names())


@pytest.mark.parametrize("name, values", CASES, ids=[f"{n}-{'-'.join(v) or 'default'}" for n, v in CASES])
def test_a_run_stopped_after_any_step_resumes_bit_identically(name, values, tiny_backdoor):
    spec = get_method(name)
    cfg = tiny_config(name, **values)

    def context(**kwargs) -> Recording:
        provider = None if spec.kind == "attack" else (lambda: tiny_backdoor)
        return Recording(data_config=TINY_DATA, fast=PLAIN, backdoor_provider=provider, **kwargs)

    straight = context()
    expected = spec.run(straight, cfg)
    points = stop_points(straight.stages)
    assert len(points) >= 2, straight.stages
    assert max(straight.stages) in points  # resuming after the last step: nothing left to train
    for k in points:
        resumed = context(checkpoint=straight.checkpoints[k])
        result = spec.run(resumed, cfg)
        assert expected.model_state.keys() == result.model_state.keys()
        for key, value in expected.model_state.items():
            assert torch.equal(value, result.model_state[key]), f"{name}: {key} differs after resuming from step {k}"
        # the reports after the checkpoint's step, as the straight run made them; from the last step, nothing but
        # the final report of a defense that returns an earlier step's weights (NaN-aware: split metrics of an
        # empty pool are NaN)
        np.testing.assert_equal(straight.reports[:k] + resumed.reports, straight.reports, f"resumed from {k}")
        assert_same_handoffs(straight, resumed)
