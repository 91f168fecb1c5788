"""Trojan: a fixed additive 3x3 patch in the style of TrojanNN (Liu et al., "Trojaning Attack on Neural
Networks", NDSS 2018). TrojanNN optimises its patch against a model; like D-BR/NAD/ARGD we use a fixed one, but
ours is generated once by this project from a seed (assets/trojan_patch.npy), nothing from the official
repositories: x' = clip(x + T)."""

from __future__ import annotations

from methods.attacks.base import run_attack
from methods.attacks.configs.trojan import TrojanConfig
from methods.attacks.triggers import AdditiveTrigger, trojan_patch
from methods.core.method import register_method
from methods.data.configs import DatasetInfo


def make_trojan_trigger(info: DatasetInfo, cfg: TrojanConfig, seed: int) -> AdditiveTrigger:
    delta, _ = trojan_patch(info.channels, info.size)
    return AdditiveTrigger({"channels": info.channels, "size": info.size}, {"delta": delta})


@register_method("trojan")
def run(ctx, cfg: TrojanConfig):
    return run_attack(ctx, "trojan", cfg, make_trojan_trigger)
