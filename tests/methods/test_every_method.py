"""Every registered method, on every training path: a short run with each fast-path switch forced on (bf16 autocast
and channels_last run on CPU too) and with all of them off. Parametrised over the registry, so a new attack or
defense is covered by this file without a line added here; its search space's `quick:` block says what small
means, and the epoch-like counts are cut further so the whole matrix stays within the CI budget."""

from __future__ import annotations

import math

import pytest
import torch

from methods.core.context import LocalContext
from methods.core.fastpath import FastForward, FastPath
from methods.core.knowledge import classified
from methods.core.method import get_method, method_names
from tests.methods.conftest import TINY_DATA, tiny_config

ALL_ON = FastPath(bf16=True, channels_last=True, cudnn_benchmark=False)
ALL_OFF = FastPath(bf16=False, channels_last=False, cudnn_benchmark=False)
PATHS = {"fast": ALL_ON, "plain": ALL_OFF}


class CountingContext(LocalContext):
    """Records what wrap_model returned, so the test can see that training really went through the fast path."""

    wrapped: list

    def wrap_model(self, model):
        out = super().wrap_model(model)
        self.__dict__.setdefault("wrapped", []).append(out)
        return out


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("name", method_names())
def test_every_method_trains_on_the_fast_and_the_plain_path(name, path, tiny_backdoor):
    spec = get_method(name)
    fast = PATHS[path]
    ctx = CountingContext(
        data_config=TINY_DATA, fast=fast, backdoor_provider=None if spec.kind == "attack" else (lambda: tiny_backdoor)
    )
    result = spec.run(ctx, tiny_config(name))
    assert ctx.reports, f"{name} reported nothing"
    # the engine says how many steps its stages report (a single run's progress line shows step n/total) and keeps
    # to it; only the returned model's own report may follow (methods.defenses.shared.common.final_result)
    steps = [step for step, _ in ctx.reports]
    assert ctx.expected_steps in steps and max(steps[:-1], default=0) <= ctx.expected_steps, (
        name,
        ctx.expected_steps,
        steps,
    )
    assert steps[-1] <= ctx.expected_steps + 1, (name, ctx.expected_steps, steps)
    final = ctx.reports[-1][1]
    # split statistics may be undefined on a tiny run (an AUROC over a pool with one class); these may not
    for key in ("val_acc", "val_asr", "test_acc", "test_asr"):
        if key in final:
            assert 0.0 <= final[key] <= 1.0 and math.isfinite(final[key]), (key, final)
    # a blind sweep may select only on what methods.core.knowledge calls blind: every name must be stated there
    unclassified = sorted({k for _, m in ctx.reports for k in m if not classified(k)})
    assert not unclassified, f"{name} reports metrics methods/core/knowledge.py does not classify: {unclassified}"
    if spec.kind == "defense":  # the blind signal every defense reports (methods/core/blind_signals.py)
        assert all(0.0 <= m["val_adv_concentration"] <= 1.0 for _, m in ctx.reports), name
    wrapped = ctx.__dict__.get("wrapped", [])
    assert wrapped, f"{name} never trains through ctx.wrap_model, so no fast switch reaches it"
    if path == "fast":
        assert all(isinstance(w, FastForward) for w in wrapped)
    else:
        assert not any(isinstance(w, FastForward) for w in wrapped)
    weights = result.model_state
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
