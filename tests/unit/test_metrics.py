from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from methods.core.metrics import POOL_CLEAN, POOL_POISON, POOL_UNCERTAIN, accuracy, auroc, der, split_metrics


def test_der_bounds_and_examples():
    assert der(0.9, 1.0, 0.9, 0.0) == 1.0
    assert der(0.9, 1.0, 0.9, 1.0) == 0.5
    assert der(0.9, 0.1, 0.0, 0.5) == pytest.approx(0.05)
    assert der(0.9, 1.0, 0.95, 0.0) == 1.0, "an accuracy gain is not rewarded beyond 1"


def test_accuracy():
    assert accuracy(torch.tensor([1, 2, 3]), torch.tensor([1, 0, 3])) == pytest.approx(2 / 3)


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 200).astype(float)
    flags = rng.random(200) < 0.3
    assert auroc(scores, flags) == pytest.approx(roc_auc_score(flags, scores))
    assert auroc([1, 2, 3], [False, False, True]) == 1.0


def test_split_metrics_on_a_toy_split():
    flags = np.array([1, 1, 0, 0, 0, 0, 0, 0], dtype=bool)
    pools = np.array(
        [POOL_POISON, POOL_CLEAN, POOL_POISON, POOL_CLEAN, POOL_CLEAN, POOL_UNCERTAIN, POOL_CLEAN, POOL_UNCERTAIN]
    )
    m = split_metrics(pools, flags)
    assert m["split_poison_precision"] == 0.5 and m["split_poison_recall"] == 0.5
    assert m["split_clean_precision"] == 0.75 and m["split_clean_recall"] == 0.5
    assert m["pool_clean_size"] == 4 and m["pool_poison_size"] == 2
    assert m["pool_clean_poisoned_frac"] == 0.25
