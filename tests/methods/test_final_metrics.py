"""Every defense's result is the model it returns: the last report of a run (what MLflow keeps as the run's
metrics, what Tune ranks and `bdo report` tabulates) equals an evaluation of the weights the defense returns.
Each registered defense runs at a quick size on the shared digits BadNets backdoor; D-BR is also forced to keep
a round that is not its last."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from methods.attacks.base import evaluate
from methods.core.context import LocalContext, deserialize_state, serialize_state
from methods.core.method import get_method, method_names
from methods.defenses.sd import sd_steps
from tests.conftest import train_backdoor

ROOT = Path(__file__).resolve().parents[2]
KEYS = ("val_acc", "val_asr", "test_acc", "test_asr")
# measured only for the returned model (methods.defenses.shared.common.final_result); no canary is planted here
TEST_SIGNALS = {"test_adv_concentration", "test_label_excess", "test_blind_score"}
# Fewer epochs than the search spaces' quick blocks, which mostly shrink the data (that a defense on the shared
# backdoor does not use): a couple of epochs per stage is enough to move the weights.
SPLIT = {"sd_pretrain_epochs": 1, "sd_ft_epochs": 1, "fct_n_draws": 1}
SHRINK = {
    "aft": {"epochs": 2, "adv_epochs": 1},
    "asd": {"epochs": 2, "iterations_per_epoch": 2},
    "dbr": {**SPLIT, "br_rounds": 2},
    "dst": {**SPLIT, "st_epochs": 1, "st_warmup_epochs": 0, "st_cls_epochs": 1},
    "pbe": {"n_steps": 2, "epochs_per_step": 2, "top_rates": [0.3]},
    "sd": SPLIT,
}


def quick_config(name: str) -> dict:
    """The digits preset, then the search space's quick block (its method keys), then SHRINK."""
    values = {}
    preset = ROOT / "search_spaces/presets/digits" / f"{name}.yaml"
    if preset.exists():
        values.update(yaml.safe_load(preset.read_text()) or {})
    space = ROOT / "search_spaces" / f"{name}.yaml"
    if space.exists():
        quick = (yaml.safe_load(space.read_text()) or {}).get("quick") or {}
        values.update({k: v for k, v in quick.items() if not k.startswith("data.")})
    return {**values, **SHRINK.get(name, {})}


def returned_model_metrics(backdoor, result) -> dict[str, float]:
    model = backdoor.build_model()
    model.load_state_dict(result.model_state)
    return evaluate(model, backdoor.data)


def run_defense(name: str, backdoor, **overrides):
    spec = get_method(name)
    ctx = LocalContext(backdoor_provider=lambda: backdoor)
    result = spec.run(ctx, spec.make_config({**quick_config(name), **overrides}))
    return ctx, result


def assert_last_report_is_the_returned_model(ctx, result, backdoor):
    steps = [s for s, _ in ctx.reports]
    assert steps == sorted(set(steps)), "steps rise"
    last = ctx.reports[-1][1]
    evaluated = returned_model_metrics(backdoor, result)
    for key in KEYS:
        assert last[key] == evaluated[key], f"{key}: last report {last[key]} vs returned weights {evaluated[key]}"
        assert result.metrics[key] == evaluated[key], key
    # the result's metrics are the last report, plus the test split's blind signals when no final report was due
    assert set(result.metrics) - set(last) <= TEST_SIGNALS, set(result.metrics) - set(last)
    assert TEST_SIGNALS <= set(result.metrics)
    assert all(v == result.metrics[k] or (math.isnan(v) and math.isnan(result.metrics[k])) for k, v in last.items())


@pytest.mark.parametrize("name", method_names("defense"))
def test_last_report_is_an_evaluation_of_the_returned_weights(name):
    backdoor = train_backdoor("badnets")
    ctx, result = run_defense(name, backdoor)
    assert_last_report_is_the_returned_model(ctx, result, backdoor)


def test_dbr_reports_an_earlier_kept_round_as_its_final_step():
    # An unlearning lr 100x the relearning one wrecks the model from the second round on (val ACC ~0.3), so the
    # first round, the only one near the best val ACC, is kept and the last round is not.
    backdoor = train_backdoor("badnets")
    rounds = 4
    ctx, result = run_defense("dbr", backdoor, br_rounds=rounds, br_unlearn_lr_scale=100.0)
    first = sd_steps(get_method("dbr").make_config(quick_config("dbr")))
    steps = [s for s, _ in ctx.reports]
    assert steps == list(range(1, first + rounds + 2)), "one final step after the last round"
    round_reports = {int(m["br_round"]): m for s, m in ctx.reports[first : first + rounds]}
    final = ctx.reports[-1][1]
    kept = int(final["br_kept_round"])
    assert kept < rounds and final["kept_step"] == first + kept
    assert round_reports[rounds]["br_kept_round"] == kept, "the last round's report already names the choice"
    assert all(final[key] == round_reports[kept][key] for key in KEYS)
    assert final["val_acc"] > round_reports[rounds]["val_acc"] + 0.1, "the wrecked last round is not returned"
    assert_last_report_is_the_returned_model(ctx, result, backdoor)


def test_a_resumed_run_with_nothing_left_returns_what_its_checkpoint_reported():
    # A run stopped after its last checkpoint (a trial whose node died before it could end) resumes into no
    # training. The checkpoint carries the report it closed, which describes the restored weights: nothing new is
    # reported, so the run's record gets no extra step, and the result is that report.
    backdoor = train_backdoor("badnets")
    spec = get_method("ft")
    cfg = spec.make_config(quick_config("ft"))
    straight = LocalContext(backdoor_provider=lambda: backdoor)
    expected = spec.run(straight, cfg)
    resumed = LocalContext(backdoor_provider=lambda: backdoor, checkpoint=straight.checkpoint)
    result = spec.run(resumed, cfg)
    assert resumed.reports == []
    assert_last_report_is_the_returned_model(straight, result, backdoor)
    assert "kept_step" not in result.metrics
    assert all(torch.equal(v, result.model_state[k]) for k, v in expected.model_state.items())


def test_a_resumed_run_whose_checkpoint_has_no_report_reports_its_returned_model():
    # A checkpoint written before checkpoints carried their report: the result is reported once more.
    backdoor = train_backdoor("badnets")
    spec = get_method("ft")
    cfg = spec.make_config(quick_config("ft"))
    straight = LocalContext(backdoor_provider=lambda: backdoor)
    spec.run(straight, cfg)
    state = deserialize_state(straight.checkpoint)
    del state["extra"]["report"]
    resumed = LocalContext(backdoor_provider=lambda: backdoor, checkpoint=serialize_state(state))
    result = spec.run(resumed, cfg)
    assert [s for s, _ in resumed.reports] == [straight.reports[-1][0] + 1]
    assert_last_report_is_the_returned_model(resumed, result, backdoor)
    assert result.metrics["kept_step"] == straight.reports[-1][0]
