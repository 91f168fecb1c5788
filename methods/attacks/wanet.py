"""WaNet: an imperceptible warping trigger (Nguyen & Tran, "WaNet - Imperceptible Warping-based Backdoor
Attack", ICLR 2021). The grids are built once from the poison seed and saved with the attack so defenses can
evaluate it; cross_ratio x (poisoned count) further images get a randomly jittered warp with their true label
(the "noise mode" regulariser). Training uses the crop/rotation augmentation of the WaNet code base; its
rotation (10 degrees by default) moves border pixels of a small image further than a weak warp does, so
`rotation_deg` can turn it down or off (0) without touching crop and flip."""

from __future__ import annotations

import functools

import torch

from methods.attacks.base import PoisonedData, run_attack
from methods.attacks.configs.wanet import WaNetConfig
from methods.attacks.triggers import WarpTrigger, wanet_backdoor_grid, wanet_grids, wanet_noise_grids, warp
from methods.core.method import register_method
from methods.data.augment import backdoor_pipeline_augment
from methods.data.configs import DatasetInfo


def make_wanet_trigger(info: DatasetInfo, cfg: WaNetConfig, seed: int) -> WarpTrigger:
    identity, noise = wanet_grids(info.size, cfg.k, seed)
    grid = wanet_backdoor_grid(identity, noise, cfg.s, cfg.grid_rescale)
    return WarpTrigger(
        {"channels": info.channels, "size": info.size, "k": cfg.k, "s": cfg.s, "grid_rescale": cfg.grid_rescale},
        {"grid": grid, "identity_grid": identity, "noise_grid": noise},
    )


def add_noise_mode(cfg: WaNetConfig):
    def postprocess(data: PoisonedData, seeds: dict[str, int], facts: dict[str, float]) -> None:
        g = torch.Generator().manual_seed(seeds["poison_seed"] + 1)
        clean = torch.nonzero(~data.poison_flags).flatten()
        count = min(int(cfg.cross_ratio * int(data.poison_flags.sum())), len(clean))
        facts["wanet_noise_count"] = float(count)
        if count == 0:
            return
        chosen = clean[torch.randperm(len(clean), generator=g)[:count]]
        grids = wanet_noise_grids(data.trigger.tensors["grid"], count, g)
        data.x_train[chosen] = warp(data.x_train[chosen], grids)

    return postprocess


@register_method("wanet")
def run(ctx, cfg: WaNetConfig):
    augment = functools.partial(backdoor_pipeline_augment, rotation_deg=cfg.rotation_deg)
    return run_attack(ctx, "wanet", cfg, make_wanet_trigger, augment=augment, postprocess=add_noise_mode(cfg))
