from __future__ import annotations

import torch
import torch.nn.functional as F

from methods.core.pgd import pgd_untargeted
from methods.data.embedded import DIGITS_INFO
from methods.models.base import build_model


def setup():
    torch.manual_seed(0)
    model = build_model("small_cnn", DIGITS_INFO)
    x = torch.rand(16, 1, 16, 16)
    y = torch.randint(0, 10, (16,))
    return model, x, y


def test_perturbation_within_epsilon_and_range_and_loss_rises():
    model, x, y = setup()
    model.eval()
    eps = 8 / 255
    adv = pgd_untargeted(model, x, y, eps, eps / 4, 5, generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= eps + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)


def test_same_seed_same_examples_and_model_untouched():
    model, x, y = setup()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = pgd_untargeted(model, x, y, 0.03, 0.01, 3, generator=torch.Generator().manual_seed(1))
    b = pgd_untargeted(model, x, y, 0.03, 0.01, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert model.training, "the previous mode is restored"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "eval mode: BN stats unchanged"
    assert all(p.grad is None for p in model.parameters())


def test_without_random_start_or_clamp_reproduces_the_official_loop():
    model, x, y = setup()
    adv = pgd_untargeted(model, x, y, 0.05, 0.01, 2, random_start=False, clamp=False)
    assert (adv - x).abs().max() <= 0.05 + 1e-6
    assert torch.equal(adv, pgd_untargeted(model, x, y, 0.05, 0.01, 2, random_start=False, clamp=False))
