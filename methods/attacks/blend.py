"""Blend: an alpha-blended full-image trigger (Chen, Liu, Li, Lu, Song, "Targeted Backdoor Attacks on Deep
Learning Systems Using Data Poisoning", 2017). Patterns: a fixed seeded noise image (`random`, standing in for
the Hello-Kitty image we cannot ship), D-BR's Blend-Strip (`stripe`), fresh noise per image (`noise`, the
randomPixelTrigger of NAD/D-BR) or a user image file (`file`)."""

from __future__ import annotations

from methods.attacks.base import run_attack
from methods.attacks.configs.blend import BlendConfig
from methods.attacks.triggers import BlendTrigger, image_file_pattern, random_pattern, stripe_pattern
from methods.core.method import register_method
from methods.data.configs import DatasetInfo


def make_blend_trigger(info: DatasetInfo, cfg: BlendConfig, seed: int) -> BlendTrigger:
    c, s = info.channels, info.size
    params = {
        "channels": c,
        "size": s,
        "pattern": cfg.pattern,
        "alpha": cfg.alpha,
        "alpha_test": cfg.alpha if cfg.alpha_test is None else cfg.alpha_test,
        "noise": cfg.pattern == "noise",
        "noise_seed": seed,
    }
    if cfg.pattern == "noise":
        return BlendTrigger(params, {})
    if cfg.pattern == "random":
        pattern = random_pattern(c, s, seed)
    elif cfg.pattern == "stripe":
        pattern = stripe_pattern(c, s)
    else:
        pattern = image_file_pattern(cfg.pattern_file, c, s)
    return BlendTrigger(params, {"pattern": pattern})


@register_method("blend")
def run(ctx, cfg: BlendConfig):
    return run_attack(ctx, "blend", cfg, make_blend_trigger)
