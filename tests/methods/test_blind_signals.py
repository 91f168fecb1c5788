"""The blind signals every defense reports (methods/core/blind_signals.py, methods/defenses/shared/canary.py): the
adversarial concentration separates a backdoored digits model from a clean one without disturbing anything a
method computes, and the canary is planted where the defense will meet it and refused when it is the attacker's."""

from __future__ import annotations

import pytest
import torch

from methods.core.blind_signals import blind_signals, canary_asr, default_signals
from methods.core.context import LocalContext
from methods.core.method import get_method
from methods.defenses.shared.canary import prepare_backdoor
from tests.methods.test_final_metrics import quick_config


def test_adv_concentration_is_higher_for_a_backdoored_than_for_a_clean_model(badnets_backdoor, clean_reference):
    backdoored = blind_signals(badnets_backdoor.build_model(), badnets_backdoor.data)
    clean = blind_signals(clean_reference.build_model(), clean_reference.data)
    for split in ("val", "test"):
        key = f"{split}_adv_concentration"
        # measured 0.59 / 0.57 vs 0.19 / 0.23 at digits' 16/255 on the machine the signal was calibrated on, and
        # 0.38 / 0.38 vs 0.19 / 0.20 on an AMD EPYC runner: the clean model's share stays near 0.2 across CPUs, the
        # backdoored model's moves, and it stays about twice the clean one's
        assert backdoored[key] > clean[key] + 0.1, (split, backdoored[key], clean[key])
    assert "val_canary_asr" not in backdoored, "no canary, no canary ASR"


def test_label_excess_is_low_for_the_backdoored_model_and_high_for_one_without_the_backdoor(
    badnets_backdoor, clean_reference
):
    data = badnets_backdoor.data
    backdoored = blind_signals(badnets_backdoor.build_model(), data)
    # the same recipe trained on nothing poisoned (same split), read against the attacked training set's labels:
    # it predicts the poisoned images as their own digits, which the target's label then loses
    clean = blind_signals(clean_reference.build_model(), data)
    for split in ("val", "test"):
        key = f"{split}_label_excess"
        # measured 0.01 vs 0.49 on both splits
        assert backdoored[key] < 0.1 and clean[key] > 0.3, (split, backdoored[key], clean[key])


def test_adv_concentration_disturbs_neither_the_rng_nor_the_model(badnets_backdoor):
    model = badnets_backdoor.build_model()
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    weights = {k: v.clone() for k, v in model.state_dict().items()}  # BatchNorm statistics included
    rng = torch.get_rng_state()
    first = blind_signals(model, badnets_backdoor.data)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training, "the train/eval mode is restored"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert blind_signals(model, badnets_backdoor.data) == first, "a pure function of the weights"
    signals = default_signals(badnets_backdoor.data.info)
    assert blind_signals(model, badnets_backdoor.data, signals) == first
    assert blind_signals(model, badnets_backdoor.data, signals) == first, "equal weights: the memo"
    with torch.no_grad():
        model.classifier.weight.zero_()  # every image goes to the class of the largest bias
    assert blind_signals(model, badnets_backdoor.data, signals)["val_adv_concentration"] == 1.0, "new weights"


def run_ft(backdoor, **overrides):
    spec = get_method("ft")
    ctx = LocalContext(backdoor_provider=lambda: backdoor)
    result = spec.run(ctx, spec.make_config({"epochs": 1, **overrides}))
    return ctx, result


def test_a_repairing_defense_starts_from_the_suspect_model_with_the_canary_planted(badnets_backdoor):
    cfg = get_method("ft").make_config({"canary_rate": 0.1})
    prepared = prepare_backdoor(LocalContext(), badnets_backdoor, get_method("ft"), cfg)
    canary = prepared.blind.canary
    assert canary.target == 1, "the attack's target + 1"
    assert torch.equal(prepared.data.x_train, badnets_backdoor.data.x_train), "the training set is left alone"
    data = badnets_backdoor.data
    planted = canary_asr(prepared.build_model(), canary, "val", data.x_val, data.y_val)
    before = canary_asr(badnets_backdoor.build_model(), canary, "val", data.x_val, data.y_val)
    assert before < 0.2 < 0.8 < planted, (before, planted)  # measured 0.0 and 1.0
    ctx, result = run_ft(badnets_backdoor, canary_rate=0.1)
    assert all("val_canary_asr" in m for _, m in ctx.reports)
    assert "test_canary_asr" in result.metrics, "the returned model's test split is measured once, at the end"
    plain, _ = run_ft(badnets_backdoor)
    assert not any("val_canary_asr" in m for _, m in plain.reports)


def test_a_defense_from_scratch_finds_the_canary_in_the_training_set(badnets_backdoor):
    spec = get_method("asd")
    cfg = spec.make_config({"canary_rate": 0.05, "canary_target": 3})
    prepared = prepare_backdoor(LocalContext(), badnets_backdoor, spec, cfg)
    before, after = badnets_backdoor.data, prepared.data
    changed = torch.nonzero(after.y_train != before.y_train).flatten()
    assert len(changed) == round(0.05 * len(before.y_train))
    assert (after.y_train[changed] == 3).all() and not before.poison_flags[changed].any()
    assert torch.equal(after.poison_flags, before.poison_flags), "poison_flags stay the attacker's poison"
    assert torch.equal(after.y_train_orig, before.y_train_orig)
    assert torch.equal(prepared.model_state["classifier.weight"], badnets_backdoor.model_state["classifier.weight"])
    stamped = prepared.blind.canary.trigger.apply(before.x_train[changed], test=True)
    assert torch.equal(after.x_train[changed], stamped)
    ctx = LocalContext(backdoor_provider=lambda: badnets_backdoor)
    spec.run(ctx, spec.make_config({**quick_config("asd"), "canary_rate": 0.05}))  # 2 epochs of 2 iterations
    assert all("val_canary_asr" in m for _, m in ctx.reports)


def test_sd_plants_by_its_model_choice():
    spec = get_method("sd")
    assert spec.trains_from_scratch(spec.make_config({}))
    assert not spec.trains_from_scratch(spec.make_config({"fct_model": "backdoored"}))
    assert not get_method("dbr").trains_from_scratch(get_method("dbr").make_config({}))


@pytest.mark.parametrize(
    "values, message",
    [
        ({"canary_target": 0}, "canary_target: 0 is the target of badnets"),
        ({"canary_trigger": "grid"}, "canary_trigger: grid stamps the same images as the trigger of badnets"),
        ({"canary_target": 10}, "canary_target: 10 is not a class of digits"),
    ],
)
def test_a_canary_that_is_the_attackers_is_refused(badnets_backdoor, values, message):
    with pytest.raises(ValueError, match=message) as caught:
        run_ft(badnets_backdoor, canary_rate=0.1, **values)
    assert "\n" not in str(caught.value)


def test_the_dataset_radius_and_the_config_radius(badnets_backdoor):
    assert default_signals(badnets_backdoor.data.info).eps == pytest.approx(16 / 255)
    cfg = get_method("ft").make_config({"blind_adv_eps": 4 / 255})
    prepared = prepare_backdoor(LocalContext(), badnets_backdoor, get_method("ft"), cfg)
    assert prepared.blind.eps == pytest.approx(4 / 255) and prepared.blind.step_size == pytest.approx(2 / 255)


def test_steps_report_the_validation_signals_and_the_result_adds_the_test_split(badnets_backdoor):
    ctx, result = run_ft(badnets_backdoor, epochs=2)
    assert [s for s, _ in ctx.reports] == [1, 2], "the test signals alone add no final report"
    for _, m in ctx.reports:
        assert m["val_blind_score"] == m["val_acc"] - m["val_adv_concentration"]
        assert not any(k.startswith("test_") and k.endswith(("_concentration", "_score")) for k in m), m
    final = result.metrics
    assert {k: v for k, v in final.items() if k in ctx.reports[-1][1]} == ctx.reports[-1][1]
    model = badnets_backdoor.build_model()
    model.load_state_dict(result.model_state)
    measured = blind_signals(model, badnets_backdoor.data, splits=("test",))
    assert final["test_adv_concentration"] == measured["test_adv_concentration"]
    assert final["test_blind_score"] == final["test_acc"] - final["test_adv_concentration"]


def test_the_training_set_pass_is_made_once_per_weights(badnets_backdoor, monkeypatch):
    # label_excess's pass over the training set is the costliest signal; the final result adds the test split
    # for the weights of the last report, which must reuse that pass, and changed weights must not
    from methods.core import blind_signals as module

    calls = []
    real = module.training_predictions
    monkeypatch.setattr(module, "training_predictions", lambda *args: calls.append(1) or real(*args))
    data, model = badnets_backdoor.data, badnets_backdoor.build_model()
    signals = default_signals(data.info)
    blind_signals(model, data, signals, splits=("val",))
    both = blind_signals(model, data, signals, splits=("val", "test"))
    assert len(calls) == 1
    assert both == blind_signals(model, data, default_signals(data.info)), "the same as computed afresh"
    with torch.no_grad():
        next(model.parameters()).add_(0.5)
    changed = blind_signals(model, data, signals, splits=("test",))
    assert len(calls) == 3
    assert changed == blind_signals(model, data, default_signals(data.info), splits=("test",))
