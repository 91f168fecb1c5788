"""BadNets: a visible patch trigger (Gu, Dolan-Gavitt, Garg, "BadNets: Identifying Vulnerabilities in the
Machine Learning Model Supply Chain", 2017). Patterns: D-BR/NAD/PBE's 3x3 corner checkerboard (`grid`), D-BR's
white square (`square`), the four-corner checkerboard (`four_corner`) or a user image file (`file`, stamped in
the bottom-right corner at `patch_size` px)."""

from __future__ import annotations

import torch

from methods.attacks.base import run_attack
from methods.attacks.configs.badnets import BadNetsConfig
from methods.attacks.triggers import PatchTrigger, four_corner_pattern, grid_pattern, image_file_pattern, square_pattern
from methods.core.method import register_method
from methods.data.configs import DatasetInfo


def make_badnets_trigger(info: DatasetInfo, cfg: BadNetsConfig, seed: int) -> PatchTrigger:
    c, s = info.channels, info.size
    if cfg.pattern == "grid":
        mask, pattern = grid_pattern(c, s)
    elif cfg.pattern == "square":
        mask, pattern = square_pattern(c, s)
    elif cfg.pattern == "four_corner":
        mask, pattern = four_corner_pattern(c, s)
    else:
        k = cfg.patch_size
        patch = image_file_pattern(cfg.patch_file, c, k)
        mask = torch.zeros(1, s, s, dtype=torch.bool)
        pattern = torch.zeros(c, s, s, dtype=torch.uint8)
        mask[:, s - k :, s - k :] = True
        pattern[:, s - k :, s - k :] = patch
    return PatchTrigger({"channels": c, "size": s, "pattern": cfg.pattern}, {"mask": mask, "pattern": pattern})


@register_method("badnets")
def run(ctx, cfg: BadNetsConfig):
    return run_attack(ctx, "badnets", cfg, make_badnets_trigger)
