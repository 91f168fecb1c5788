"""NAD: its AT loss on toy tensors, the official lr schedule, resumption and bad configs. Its numbers on digits
are measured beside ARGD's in test_argd.py."""

from __future__ import annotations

import pytest
import torch

from methods.defenses.nad import NADConfig
from methods.defenses.shared.attention import at_loss, attention_map, weighted_at_loss


def test_attention_power_and_normalisation():
    f = torch.zeros(2, 3, 4, 4)
    f[:, :, 0, 0] = 2.0
    f[:, :, 1, 1] = -1.0
    for p, ratio in ((1.0, 2.0), (2.0, 4.0), (4.0, 16.0)):
        a = attention_map(f, p=p)
        assert a[0, 0, 0, 0] / a[0, 0, 1, 1] == pytest.approx(ratio)
        assert a[0].norm().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.isfinite(attention_map(torch.zeros(1, 2, 3, 3))).all()


def test_at_loss_is_zero_for_equal_maps_and_grows_with_the_betas():
    g = torch.Generator().manual_seed(0)
    s = [attention_map(torch.rand(4, 3, k, k, generator=g)) for k in (8, 4, 2)]
    t = [attention_map(torch.rand(4, 3, k, k, generator=g)) for k in (8, 4, 2)]
    assert at_loss(s[0], s[0]).item() == 0.0
    single = [at_loss(a, b).item() for a, b in zip(s, t)]
    assert all(v > 0 for v in single)
    total = weighted_at_loss(s, t, (500.0, 1000.0, 1000.0)).item()
    assert total == pytest.approx(500 * single[0] + 1000 * single[1] + 1000 * single[2], rel=1e-5)
    with pytest.raises(ValueError, match="weights"):
        weighted_at_loss(s, t, (1.0, 1.0))


def test_default_schedule_is_the_official_one():
    cfg = NADConfig()
    assert (cfg.epochs, cfg.batch_size, cfg.nesterov, cfg.weight_decay) == (20, 64, True, 1e-4)
    assert [cfg.student_lr(e) for e in range(4)] == pytest.approx([0.1, 0.1, 0.01, 0.01])
    assert (cfg.beta1, cfg.beta2, cfg.beta3, cfg.p, cfg.clean_ratio) == (500.0, 1000.0, 1000.0, 2.0, 0.05)
    short = NADConfig(epochs=10)
    assert [short.student_lr(e) for e in range(3)] == pytest.approx([0.1, 0.01, 0.01])


@pytest.mark.parametrize(
    "values, field",
    [
        ({"beta2": -1.0}, "beta2"),
        ({"lr_steps": [0.1, 0.01]}, "lr_steps"),
        ({"lr_step_epochs": [0]}, "lr_step_epochs"),
        ({"teacher_epochs": 0}, "teacher_epochs"),
        ({"p": 100.0}, "p"),
        ({"batch_size": 1}, "batch_size"),
    ],
)
def test_bad_config_values_name_the_field(values, field):
    with pytest.raises(ValueError, match=field):
        NADConfig.from_dict(values)
