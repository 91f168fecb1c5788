"""Poison-index modes and label rules: counts, candidates, labels and the recorded ground truth."""

from __future__ import annotations

import pytest
import torch

from methods.attacks.badnets import BadNetsConfig, make_badnets_trigger
from methods.attacks.base import build_poisoned_data, poison_targets, select_poison_indices
from methods.data.base import load_splits


def labels(n=1000, k=10):
    return torch.arange(n) % k


@pytest.mark.parametrize("rate", [0.0, 0.05, 0.1, 0.5])
def test_default_counts_follow_the_label_mode(rate):
    y = labels()
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    a2o = select_poison_indices(y, rate, "all2one", 0, "default", g())
    assert len(a2o) == int(rate * 900) and (y[a2o] != 0).all()
    a2a = select_poison_indices(y, rate, "all2all", 0, "default", g())
    assert len(a2a) == int(rate * 1000)
    cl = select_poison_indices(y, rate, "cleanLabel", 3, "default", g())
    assert len(cl) == int(rate * 100) and (y[cl] == 3).all()


def test_uniform_and_bernoulli_modes():
    y = labels()
    uni = select_poison_indices(y, 0.1, "all2one", 0, "uniform", torch.Generator().manual_seed(0))
    assert len(uni) == 100
    ber = select_poison_indices(y, 0.1, "all2one", 0, "bernoulli", torch.Generator().manual_seed(0))
    assert 50 < len(ber) < 140 and (y[ber] != 0).all()


def test_same_seed_same_indices_other_seed_other_indices():
    y = labels()
    pick = lambda s: select_poison_indices(y, 0.1, "all2one", 0, "default", torch.Generator().manual_seed(s))  # noqa: E731
    assert torch.equal(pick(5), pick(5)) and not torch.equal(pick(5), pick(6))


def test_label_rules():
    y = torch.tensor([0, 1, 9])
    assert poison_targets(y, "all2one", 4, 10).tolist() == [4, 4, 4]
    assert poison_targets(y, "all2all", 4, 10).tolist() == [1, 2, 0]
    assert poison_targets(y, "cleanLabel", 4, 10).tolist() == [0, 1, 9]


def test_poisoned_dataset_keeps_ground_truth_and_clean_eval_sets():
    splits = load_splits("digits", split_seed=0)
    cfg = BadNetsConfig(poison_rate=0.1)
    trigger = make_badnets_trigger(splits.info, cfg, 0)
    data = build_poisoned_data(splits, cfg, trigger, poison_seed=0)
    flags = data.poison_flags
    assert int(flags.sum()) == int(0.1 * int((splits.y_train != 0).sum()))
    assert (data.y_train[flags] == 0).all() and torch.equal(data.y_train[~flags], splits.y_train[~flags])
    assert torch.equal(data.y_train_orig, splits.y_train)
    assert torch.equal(data.x_train[~flags], splits.x_train[~flags])
    assert not torch.equal(data.x_train[flags], splits.x_train[flags])
    assert torch.equal(data.x_test, splits.x_test), "test images stay clean; triggers only at evaluation"
    xb, yt, ytrue = data.backdoor_set("test")
    assert (ytrue != 0).all() and (yt == 0).all() and len(xb) == int((splits.y_test != 0).sum())


def test_digits_split_is_70_10_20_and_seeded():
    a, b = load_splits("digits", split_seed=0), load_splits("digits", split_seed=1)
    total = len(a.y_train) + len(a.y_val) + len(a.y_test)
    assert total == 1797 and a.x_train.shape[1:] == (1, 16, 16) and a.x_train.dtype == torch.uint8
    assert abs(len(a.y_train) / total - 0.7) < 0.01 and abs(len(a.y_val) / total - 0.1) < 0.01
    assert torch.equal(a.x_test, b.x_test) and not torch.equal(a.train_index, b.train_index)
    assert torch.equal(load_splits("digits", split_seed=0).train_index, a.train_index)


def test_synthetic_difficulty_keeps_labels_and_layout_and_only_widens_the_classes():
    from methods.data.embedded import synthetic_images

    easy_x, easy_y = synthetic_images(300, seed=4, difficulty=0.0)
    hard_x, hard_y = synthetic_images(300, seed=4, difficulty=1.0)
    again_x, _ = synthetic_images(300, seed=4, difficulty=1.0)
    assert torch.equal(easy_y, hard_y), "a seed draws the same labels at every difficulty"
    assert torch.equal(hard_x, again_x) and not torch.equal(easy_x, hard_x)
    assert hard_x.dtype == torch.uint8 and hard_x.shape == (300, 3, 32, 32)

    # Class colour is the easiest cue: its spread within a class grows with the difficulty.
    def colour_spread(x, y):
        mean_colour = x.float().mean(dim=(2, 3))
        return torch.stack([mean_colour[y == k].std(0).mean() for k in range(10)]).mean()

    assert colour_spread(hard_x, hard_y) > colour_spread(easy_x, easy_y)


def test_synthetic_difficulty_is_validated():
    from methods.data.base import DataConfig

    with pytest.raises(ValueError, match="synthetic_difficulty"):
        DataConfig(synthetic_difficulty=1.5)
