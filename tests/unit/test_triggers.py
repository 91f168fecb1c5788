"""Every trigger on toy tensors: dtype and range kept, only the intended pixels change, determinism."""

from __future__ import annotations

import pytest
import torch

from methods.attacks.badnets import BadNetsConfig, make_badnets_trigger
from methods.attacks.blend import BlendConfig, make_blend_trigger
from methods.attacks.cl import CLConfig, make_cl_trigger
from methods.attacks.sig import SIGConfig, make_sig_trigger
from methods.attacks.triggers import grid_pattern, trigger_from_state
from methods.attacks.trojan import TrojanConfig, make_trojan_trigger
from methods.attacks.wanet import WaNetConfig, make_wanet_trigger
from methods.data.embedded import DIGITS_INFO, SYNTHETIC_INFO


def toy(info, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, info.channels, info.size, info.size), generator=g, dtype=torch.int64).to(
        torch.uint8
    )


FACTORIES = {
    "badnets_grid": (make_badnets_trigger, BadNetsConfig(pattern="grid")),
    "badnets_square": (make_badnets_trigger, BadNetsConfig(pattern="square")),
    "badnets_four_corner": (make_badnets_trigger, BadNetsConfig(pattern="four_corner")),
    "blend_random": (make_blend_trigger, BlendConfig(pattern="random")),
    "blend_stripe": (make_blend_trigger, BlendConfig(pattern="stripe")),
    "blend_noise": (make_blend_trigger, BlendConfig(pattern="noise")),
    "trojan": (make_trojan_trigger, TrojanConfig()),
    "sig": (make_sig_trigger, SIGConfig()),
    "wanet": (make_wanet_trigger, WaNetConfig()),
    "cl": (make_cl_trigger, CLConfig()),
}


@pytest.mark.parametrize("info", [DIGITS_INFO, SYNTHETIC_INFO], ids=["digits", "synthetic"])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_dtype_range_shape_and_determinism(name, info):
    make, cfg = FACTORIES[name]
    x = toy(info)
    out = make(info, cfg, 7).apply(x)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert int(out.min()) >= 0 and int(out.max()) <= 255
    assert not torch.equal(out, x), "the trigger must change the image"
    again = make(info, cfg, 7).apply(x)
    assert torch.equal(out, again), "same seed, same output"
    # a trigger rebuilt from its saved state applies exactly the same
    t = make(info, cfg, 7)
    rebuilt = trigger_from_state(t.kind, t.params, t.tensors)
    assert torch.equal(rebuilt.apply(x, test=True), t.apply(x, test=True))


def test_grid_trigger_layout_and_only_its_pixels_change():
    info = SYNTHETIC_INFO
    x = toy(info)
    out = make_badnets_trigger(info, BadNetsConfig(pattern="grid"), 0).apply(x)
    changed = (out != x).any(1).any(0)
    assert not changed[: info.size - 3].any() and not changed[:, : info.size - 3].any()
    block = out[0, 0, -3:, -3:]
    # bottom row read from the right edge inwards: 255, 0, 255; middle 0, 255, 0; third row 255, 0, 0
    assert block[2].flip(0).tolist() == [255, 0, 255]
    assert block[1].flip(0).tolist() == [0, 255, 0]
    assert block[0].flip(0).tolist() == [255, 0, 0]
    assert (out[:, 0, -3:, -3:] == out[:, 1, -3:, -3:]).all(), "all channels the same"


def test_square_trigger_is_white_and_one_pixel_from_the_border():
    info = SYNTHETIC_INFO
    out = make_badnets_trigger(info, BadNetsConfig(pattern="square"), 0).apply(
        torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    )
    white = (out[0] == 255).all(0)
    rows, cols = torch.nonzero(white, as_tuple=True)
    assert rows.min() == 28 and rows.max() == 30 and cols.min() == 28 and cols.max() == 30


def test_four_corner_touches_only_corners():
    mask, _ = grid_pattern(1, 32)
    info = SYNTHETIC_INFO
    t = make_badnets_trigger(info, BadNetsConfig(pattern="four_corner"), 0)
    m = t.tensors["mask"][0]
    assert int(m.sum()) == 4 * int(mask.sum())
    assert not m[3:-3, :].any() and not m[:, 3:-3].any()


def test_trojan_changes_only_its_3x3_block_additively():
    info = SYNTHETIC_INFO
    x = torch.full((2, 3, 32, 32), 10, dtype=torch.uint8)
    out = make_trojan_trigger(info, TrojanConfig(), 0).apply(x)
    changed = torch.nonzero((out != x).any(1).any(0))
    assert changed[:, 0].min() == 25 and changed[:, 0].max() == 27
    assert changed[:, 1].min() == 25 and changed[:, 1].max() == 27
    assert (out >= x).all(), "additive and positive"
    saturated = make_trojan_trigger(info, TrojanConfig(), 0).apply(torch.full_like(x, 250))
    assert int(saturated.max()) == 255, "clipped, not wrapped"


def test_sig_is_column_constant_and_stronger_at_test_time():
    info = SYNTHETIC_INFO
    x = torch.full((1, 3, 32, 32), 128, dtype=torch.uint8)
    t = make_sig_trigger(info, SIGConfig(), 0)
    train, test = t.apply(x).float() - 128, t.apply(x, test=True).float() - 128
    assert (train == train[:, :, :1, :]).all(), "constant down each column"
    assert (train[:, 0] == train[:, 1]).all()
    assert train.abs().max() <= 40 and test.abs().max() > 50


def test_blend_mixes_with_alpha():
    info = DIGITS_INFO
    cfg = BlendConfig(pattern="random", alpha=0.2)
    t = make_blend_trigger(info, cfg, 3)
    x = toy(info)
    expected = (0.8 * x.float() + 0.2 * t.tensors["pattern"].float()).round()
    assert torch.equal(t.apply(x).float(), expected)


def test_wanet_identity_warp_is_near_identity_and_grids_are_saved():
    info = SYNTHETIC_INFO
    x = toy(info)
    t0 = make_wanet_trigger(info, WaNetConfig(s=0.0), 1)
    assert (t0.apply(x).int() - x.int()).abs().max() <= 1
    t = make_wanet_trigger(info, WaNetConfig(), 1)
    assert {"grid", "identity_grid", "noise_grid"} <= set(t.tensors)
    assert t.tensors["grid"].abs().max() <= 1
