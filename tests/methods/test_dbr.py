"""D-BR: removes BadNets/Blend backdoors on digits, keeps the round chosen on validation, resumes, checks config."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from methods.core.context import LocalContext
from methods.core.method import get_method
from methods.defenses.dbr import DBRConfig, _ascent, chosen, update_candidates
from methods.defenses.sd import sd_steps
from tests.conftest import assert_defended

PRESET = yaml.safe_load((Path(__file__).resolve().parents[2] / "search_spaces/presets/digits/dbr.yaml").read_text())


def test_unlearning_loss_is_negative_cross_entropy():
    logits, labels = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    assert _ascent(logits, labels).item() == pytest.approx(-torch.nn.functional.cross_entropy(logits, labels).item())


@pytest.mark.parametrize(
    "values, message",
    [
        ({"alpha_c": 0.9, "alpha_p": 0.2}, "alpha_c \\+ alpha_p"),
        ({"br_lr": -1e-4}, "br_lr"),
        ({"br_rounds": 0}, "br_rounds"),
        ({"br_relearn_epochs": 0}, "br_relearn_epochs"),
        ({"br_select": "test"}, "br_select"),
        ({"br_select": "val_acc_minus_asr"}, "br_select"),
        ({"br_acc_margin": -0.01}, "br_acc_margin"),
        ({"br_unlearn_lr_scale": -1.0}, "br_unlearn_lr_scale"),
        ({"br_acc_reference": "clean"}, "br_acc_reference"),
    ],
)
def test_bad_dbr_config_names_the_field(values, message):
    with pytest.raises(ValueError, match=message):
        DBRConfig.from_dict(values)


def brute_force_choice(rounds: list[tuple[float, float]], margin: float, ceiling: float = math.inf) -> int:
    """The margin rule stated in DBRConfig, over every (val ACC, minimised metric) round at once: index of the
    lowest metric among the rounds whose val ACC is within `margin` of the best, or of `ceiling` (the suspect
    model's) where that is lower (ties: higher ACC, then later)."""
    best = min(max(acc for acc, _ in rounds), ceiling)
    eligible = [i for i, (acc, _) in enumerate(rounds) if acc >= best - margin]
    return min(eligible, key=lambda i: (rounds[i][1], -rounds[i][0], -i))


@pytest.mark.parametrize("seed", range(40))
def test_kept_round_candidates_give_the_rule_over_all_rounds(seed):
    # Holding only the candidate rounds' weights must choose what the rule chooses over every round. Coarse
    # values (steps of 0.05) make ties and rounds exactly at the margin common.
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 15, (1,), generator=g))
    values = [(0.05 * int(a), 0.05 * int(b)) for a, b in torch.randint(10, 21, (n, 2), generator=g).tolist()]
    margin = 0.05 * int(torch.randint(0, 4, (1,), generator=g))
    # half the cases count the margin from a suspect model's accuracy, which some rounds exceed
    ceiling = 0.05 * int(torch.randint(10, 21, (1,), generator=g)) if seed % 2 else math.inf
    candidates = []
    for i, (acc, asr) in enumerate(values):
        candidates = update_candidates(
            candidates, {"round": i + 1, "acc": acc, "risk": asr}, margin, "asr_within_acc_margin", ceiling
        )
        assert chosen(candidates)["round"] == brute_force_choice(values[: i + 1], margin, ceiling) + 1
    assert len(candidates) <= n


def test_the_margin_rule_never_trades_accuracy_for_asr():
    rounds = [(0.98, 0.14), (0.85, 0.0), (0.975, 0.05), (0.70, 0.0)]
    candidates = []
    for i, (acc, asr) in enumerate(rounds):
        candidates = update_candidates(
            candidates, {"round": i + 1, "acc": acc, "risk": asr}, 0.02, "asr_within_acc_margin"
        )
    assert chosen(candidates)["round"] == 3, "ACC 0.975 / ASR 0.05, not 0.85 / 0.00"
    # round 2 and 4 fall outside the margin; round 1 stays (the best ACC: a later round could make it the choice)
    assert [c["round"] for c in candidates] == [1, 3]
    last = []
    for i, (acc, asr) in enumerate(rounds):
        last = update_candidates(last, {"round": i + 1, "acc": acc, "risk": asr}, 0.02, "last")
    assert chosen(last)["round"] == 4


def test_the_margin_counts_from_the_suspect_model_when_relearning_lifted_a_round_above_it():
    # cifar10_jpeg's cpu recipe, BadNets seed 0 (val ACC, val ASR by round): the first relearning lifted val ACC
    # from the suspect model's 0.724 to 0.734, and the rounds that removed the trigger lost less than 2 points
    # against the suspect model but more against that round
    rounds = [(0.734, 0.98), (0.714, 0.063), (0.706, 0.039), (0.694, 0.036)]

    def kept(ceiling: float) -> int:
        candidates = []
        for i, (acc, asr) in enumerate(rounds):
            entry = {"round": i + 1, "acc": acc, "risk": asr}
            candidates = update_candidates(candidates, entry, 0.02, "asr_within_acc_margin", ceiling)
        return chosen(candidates)["round"]

    assert kept(math.inf) == 2, "best_round: within 0.02 of 0.734"
    assert kept(0.724) == 3, "suspect: within 0.02 of 0.724; round 4 lost 3 points"
    assert kept(0.75) == 2, "a suspect model above every round changes nothing"


@pytest.mark.slow
def test_dbr_removes_the_backdoor_on_digits(digits_backdoor):
    spec = get_method("dbr")
    cfg = spec.make_config(PRESET)
    ctx = LocalContext(backdoor_provider=lambda: digits_backdoor)
    result = spec.run(ctx, cfg)
    before, after = digits_backdoor.metrics, result.metrics
    first, last = sd_steps(cfg), sd_steps(cfg) + cfg.br_rounds
    steps = [s for s, _ in ctx.reports]
    assert steps[:last] == list(range(1, last + 1))
    rounds = [m for s, m in ctx.reports if first < s <= last]
    assert all("split_poison_precision" in m for m in rounds)
    # the kept round follows the rule on validation (never test), and the final metrics are that round's
    best = brute_force_choice([(m["val_acc"], m["val_asr"]) for m in rounds], cfg.br_acc_margin)
    assert after["br_kept_round"] == best + 1
    # an earlier round than the last is reported once more, as the run's final step: the records show that model
    assert steps == list(range(1, last + 1)) + ([last + 1] if best + 1 < cfg.br_rounds else [])
    assert after["test_asr"] == rounds[best]["test_asr"] and after["test_acc"] == rounds[best]["test_acc"]
    assert after["val_acc"] >= max(m["val_acc"] for m in rounds) - cfg.br_acc_margin
    print(
        f"\nD-BR {digits_backdoor.attack}: ACC {before['test_acc']:.3f} -> {after['test_acc']:.3f}, "
        f"ASR {before['test_asr']:.3f} -> {after['test_asr']:.3f} (round {int(after['br_kept_round'])}), "
        f"poison pool precision {after['split_poison_precision']:.3f}, clean pool precision "
        f"{after['split_clean_precision']:.3f}"
    )
    assert before["test_asr"] >= 0.9
    assert_defended(f"dbr on {digits_backdoor.attack}", after, before)


def test_best_val_acc_keeps_the_best_round_and_the_later_of_a_tie():
    rounds = [(0.90, 0.0), (0.95, 0.9), (0.95, 1.0), (0.93, 0.0)]
    candidates = []
    for i, (acc, asr) in enumerate(rounds):
        candidates = update_candidates(candidates, {"round": i + 1, "acc": acc, "risk": asr}, 0.02, "best_val_acc")
    assert [c["round"] for c in candidates] == [3] and chosen(candidates)["round"] == 3


@pytest.mark.parametrize(
    "values, rule",
    [
        ({}, "asr_within_acc_margin"),
        ({"knowledge": "blind"}, "pool_fit_within_acc_margin"),
        ({"knowledge": "blind", "br_select": "best_val_acc"}, "best_val_acc"),
        ({"knowledge": "blind", "canary_rate": 0.1}, "canary_within_acc_margin"),
        ({"knowledge": "blind", "br_select": "concentration_within_acc_margin"}, "concentration_within_acc_margin"),
        ({"knowledge": "blind", "br_select": "last"}, "last"),
    ],
)
def test_the_kept_round_rule_follows_knowledge_unless_set(values, rule):
    assert DBRConfig.from_dict(values).selection_rule() == rule


def test_an_oracle_rule_under_blind_knowledge_is_refused_naming_both_fields():
    with pytest.raises(ValueError, match="br_select: asr_within_acc_margin .* knowledge: blind"):
        DBRConfig.from_dict({"knowledge": "blind", "br_select": "asr_within_acc_margin"})


def test_the_canary_rule_without_a_canary_is_refused():
    with pytest.raises(ValueError, match="br_select: canary_within_acc_margin .* set canary_rate > 0"):
        DBRConfig.from_dict({"br_select": "canary_within_acc_margin"})


@pytest.mark.parametrize(
    "values, minimised",
    [
        ({}, "br_poison_pool_fit"),  # the blind default without a canary
        ({"br_select": "best_val_acc"}, None),
        ({"br_select": "concentration_within_acc_margin"}, "val_adv_concentration"),
        ({"canary_rate": 0.1}, "val_canary_asr"),  # the canary's margin rule
    ],
)
def test_the_blind_kept_round_never_reads_trigger_or_flag_metrics(
    badnets_backdoor, oracle_metrics_nan, values, minimised
):
    import methods.defenses.sd as sd
    import methods.defenses.shared.common as common

    spec = get_method("dbr")
    cfg = spec.make_config(dict(PRESET, sd_ft_epochs=1, br_rounds=3, knowledge="blind", **values))

    def run():
        ctx = LocalContext(backdoor_provider=lambda: badnets_backdoor)
        return ctx, spec.run(ctx, cfg)

    ctx, plain = run()
    rounds = [m for s, m in ctx.reports if sd_steps(cfg) < s <= sd_steps(cfg) + cfg.br_rounds]
    # best_val_acc is the margin rule over rounds of equal risk: the best val ACC, the later round on ties
    best = brute_force_choice([(m["val_acc"], m[minimised] if minimised else 0.0) for m in rounds], cfg.br_acc_margin)
    assert plain.metrics["br_kept_round"] == best + 1
    # the round's evaluation, SD's split metrics and its FCT AUROC: everything D-BR's choice could see
    oracle_metrics_nan((common, "evaluate_with_der"), (common, "split_metrics"), (sd, "_val_fct_auroc"))
    poisoned_ctx, poisoned = run()
    seen = [m for s, m in poisoned_ctx.reports if sd_steps(cfg) < s <= sd_steps(cfg) + cfg.br_rounds]
    assert all(math.isnan(m["val_asr"]) and math.isnan(m["split_poison_precision"]) for m in seen)
    assert poisoned.metrics["br_kept_round"] == plain.metrics["br_kept_round"]
    for key, value in plain.model_state.items():
        assert torch.equal(value, poisoned.model_state[key]), key
