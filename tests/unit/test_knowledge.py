"""The knowledge level of metrics: what a defender must know to compute each (methods/core/knowledge.py)."""

from __future__ import annotations

import pytest

from methods.core.knowledge import BLIND, ORACLE, classified, knowledge_of


@pytest.mark.parametrize(
    "metric",
    [
        "val_asr",
        "test_asr",
        "val_ra",
        "val_der",
        "val_implant",
        "val_fct_auroc",
        "split_poison_precision",
        "split_clean_recall",
        "split_auroc",
        "pool_clean_poisoned_frac",
        "pbe_next_poisoned_frac",
        "pbe_step0_failed",
    ],
)
def test_metrics_that_read_the_trigger_or_the_flags_are_oracle(metric):
    assert classified(metric) and knowledge_of(metric) == ORACLE


@pytest.mark.parametrize(
    "metric",
    [
        "val_acc",
        "test_acc",
        "train_loss",
        "lr",
        "br_kept_round",
        "kept_step",
        "pool_clean_size",
        "pool_poison_size",
        "val_adv_concentration",
        "val_blind_score",
        "test_canary_asr",
    ],
)
def test_metrics_a_defender_can_compute_are_blind(metric):
    assert classified(metric) and knowledge_of(metric) == BLIND


def test_an_unknown_metric_is_oracle_and_unclassified():
    assert not classified("val_something_new") and knowledge_of("val_something_new") == ORACLE
