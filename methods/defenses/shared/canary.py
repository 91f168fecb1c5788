"""The canary: a backdoor of the defender's own, planted before a defense runs, whose ASR after the defense
(`val_canary_asr`, `test_canary_asr`) is a blind sign of how well the defense removes a backdoor. The defender
chose its trigger and target, so measuring it reads nothing of the attacker's (docs/methods.md#blind-signals).

Where it is planted depends on what the defense returns (MethodSpec.from_scratch):
- a defense that trains its model from scratch on the suspect training set (D-ST, ASD, SD with the short model)
  finds `canary_rate` of the training set stamped with the canary trigger and relabelled to the canary target,
  as the attacker's poison is. The images are drawn among those the attacker left alone (so the attack's poison
  is unchanged) and are not added to `poison_flags`, which stays the attacker's poison;
- a defense that repairs the suspect model (FT, NAD, ARGD, AFT, PBE, D-BR) gets that model fine-tuned first, for
  `canary_epochs`, on its clean extra set (`canary_clean_ratio`, the recorded clean seed) with `canary_rate` of
  it stamped and relabelled. The training set the defense reads stays as it was: stamping it as well would put
  canary images into the clean subsets FT and the distillation defenses fine-tune on, which would keep the
  canary alive whatever the defense does.

This module also sets the blind signals' settings from the config (methods/core/blind_signals.py), and every
defense's run is dispatched through it (registered for MethodSpec.run by methods/defenses/__init__.py), so no
defense needs to know about either.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch

from methods.attacks.base import Backdoor, PoisonedData
from methods.attacks.triggers import PatchTrigger, grid_pattern
from methods.core.blind_signals import BlindSignals, Canary, canary_asr, dataset_eps
from methods.core.training import derive_seed, make_generator, sgd, train_epoch
from methods.data.augment import standard_augment
from methods.defenses.configs.shared import DefenseConfig
from methods.defenses.shared.common import clean_subset

CANARY_BATCH_SIZE = 64


def cross_pattern(channels: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An X of 3 x 3 blocks (k = size // 16 px each, at least 1) one block below the top edge, centred: away from
    every corner and from the bottom-right area where this project's patch triggers sit (BadNets' grid and
    square, the four corners, Trojan's patch), and a local patch unlike the whole-image Blend, SIG and WaNet."""
    k = max(1, size // 16)
    block = torch.tensor([[255, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)
    block = block.repeat_interleave(k, 0).repeat_interleave(k, 1)
    side = 3 * k
    top, left = k, (size - side) // 2
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    pattern = torch.zeros(channels, size, size, dtype=torch.uint8)
    mask[:, top : top + side, left : left + side] = True
    pattern[:, top : top + side, left : left + side] = block
    return mask, pattern


PATTERNS: dict[str, Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]] = {
    "cross": cross_pattern,
    "grid": grid_pattern,
}


def make_canary(data: PoisonedData, cfg: DefenseConfig, attack: str = "the attack") -> Canary:
    """The canary of this config on this data; refuses a target or a trigger that is the attacker's."""
    info = data.info
    attacked = data.label_mode != "all2all"  # all2all has no single target to avoid
    target = (data.target + 1) % info.num_classes if cfg.canary_target is None else cfg.canary_target
    if not 0 <= target < info.num_classes:
        raise ValueError(f"canary_target: {target} is not a class of {info.name} (0..{info.num_classes - 1})")
    if attacked and target == data.target:
        raise ValueError(
            f"canary_target: {target} is the target of {attack}; the canary must be a backdoor of the "
            f"defender's own: choose another class (default: the attack's target + 1)"
        )
    mask, pattern = PATTERNS[cfg.canary_trigger](info.channels, info.size)
    trigger = PatchTrigger(
        {"channels": info.channels, "size": info.size, "pattern": f"canary_{cfg.canary_trigger}"},
        {"mask": mask, "pattern": pattern},
    )
    if _same_trigger(trigger, data.trigger, info.channels, info.size):
        raise ValueError(
            f"canary_trigger: {cfg.canary_trigger} stamps the same images as the trigger of {attack}; "
            "the canary must be a backdoor of the defender's own: choose another canary_trigger"
        )
    return Canary(trigger, target)


def _same_trigger(a: Any, b: Any, channels: int, size: int) -> bool:
    """Whether two triggers turn the same probe images (grey, black, white and seeded noise) into the same ones."""
    g = torch.Generator().manual_seed(0)
    plain = [torch.full((1, channels, size, size), v, dtype=torch.uint8) for v in (128, 0, 255)]
    probe = torch.cat(plain + [torch.randint(0, 256, (4, channels, size, size), generator=g).to(torch.uint8)])
    return torch.equal(a.apply(probe, test=True), b.apply(probe, test=True))


def _pick(eligible: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` of the eligible indices (a bool mask), drawn with `generator`, sorted."""
    candidates = torch.nonzero(eligible.cpu()).flatten()
    order = torch.randperm(len(candidates), generator=generator)
    return candidates[order[: min(count, len(candidates))]].sort().values


def stamp_training_set(backdoor: Backdoor, canary: Canary, cfg: DefenseConfig) -> tuple[Backdoor, int]:
    """The backdoor with `canary_rate` of its training set stamped and relabelled (poison_flags unchanged)."""
    data = backdoor.data
    n = len(data.y_train)
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, "canary"))
    eligible = ~data.poison_flags.cpu() & (data.y_train.cpu() != canary.target)
    idx = _pick(eligible, max(1, round(cfg.canary_rate * n)), g).to(data.y_train.device)
    x, y = data.x_train.clone(), data.y_train.clone()
    x[idx] = canary.trigger.apply(x[idx], test=False)
    y[idx] = canary.target
    return dataclasses.replace(backdoor, data=dataclasses.replace(data, x_train=x, y_train=y)), len(idx)


def plant_in_model(ctx: Any, backdoor: Backdoor, canary: Canary, cfg: DefenseConfig) -> tuple[Backdoor, int]:
    """The backdoor whose model is the suspect model fine-tuned on its clean extra set with the canary in it."""
    device = ctx.device
    moved = backdoor.to(device)
    data = moved.data
    idx = clean_subset(moved, cfg.canary_clean_ratio, cfg.clean_seed)
    x, y = data.x_train[idx].clone(), data.y_train[idx].clone()
    pick_g = torch.Generator().manual_seed(derive_seed(cfg.seed, "canary"))
    stamped = _pick(y != canary.target, max(1, round(cfg.canary_rate * len(y))), pick_g).to(y.device)
    x[stamped] = canary.trigger.apply(x[stamped], test=False)
    y[stamped] = canary.target
    # The global RNG is left as the defense would have found it (building the model draws its initial weights).
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = moved.build_model(device)
        optimizer = sgd(model.parameters(), cfg.canary_lr, 0.9, 5e-4)
        g = make_generator(derive_seed(cfg.seed, "canary_train"), device)
        for _ in range(cfg.canary_epochs):
            train_epoch(model, optimizer, x, y, CANARY_BATCH_SIZE, g, lambda xb: standard_augment(xb, data.info, g))
    model.eval()
    planted = canary_asr(model, canary, "val", data.x_val, data.y_val)
    ctx.progress(
        f"canary planted in the suspect model: {cfg.canary_epochs} epochs on {len(y)} clean images, "
        f"{len(stamped)} stamped to class {canary.target}; its val canary ASR {planted:.4f}"
    )
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return dataclasses.replace(backdoor, model_state=state), len(stamped)


def blind_settings(cfg: DefenseConfig, info: Any) -> BlindSignals:
    eps = dataset_eps(info) if cfg.blind_adv_eps is None else cfg.blind_adv_eps
    step = eps / 2 if cfg.blind_adv_step_size is None else cfg.blind_adv_step_size
    return BlindSignals(
        eps=eps, steps=cfg.blind_adv_steps, step_size=step, images=cfg.blind_adv_images, seed=cfg.blind_adv_seed
    )


def prepare_backdoor(ctx: Any, backdoor: Backdoor, spec: Any, cfg: DefenseConfig) -> Backdoor:
    """The suspect backdoor as this defense run sees it: blind-signal settings attached, canary planted if asked."""
    signals = blind_settings(cfg, backdoor.data.info)
    if cfg.canary_rate <= 0:
        return dataclasses.replace(backdoor, blind=signals)
    canary = make_canary(backdoor.data, cfg, backdoor.attack)
    if spec.trains_from_scratch(cfg):
        backdoor, count = stamp_training_set(backdoor, canary, cfg)
        ctx.progress(f"canary stamped into the training set: {count} images relabelled to class {canary.target}")
    else:
        backdoor, count = plant_in_model(ctx, backdoor, canary, cfg)
    return dataclasses.replace(backdoor, blind=dataclasses.replace(signals, canary=canary))


class BlindContext:
    """The run context a defense is handed: the caller's, except that backdoor() returns the prepared backdoor
    (prepared once per run; a resumed run prepares it again, the same way)."""

    def __init__(self, ctx: Any, spec: Any, cfg: DefenseConfig) -> None:
        object.__setattr__(self, "_inner", ctx)
        object.__setattr__(self, "_spec", spec)
        object.__setattr__(self, "_cfg", cfg)
        object.__setattr__(self, "_prepared", None)

    def backdoor(self) -> Backdoor:
        if self._prepared is None:
            object.__setattr__(
                self, "_prepared", prepare_backdoor(self._inner, self._inner.backdoor(), self._spec, self._cfg)
            )
        return self._prepared

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)


def with_blind_signals(run: Callable[..., Any], spec: Any) -> Callable[..., Any]:
    """`run` of the defense `spec`, handed a BlindContext."""

    @functools.wraps(run)
    def dispatched(ctx: Any, cfg: DefenseConfig) -> Any:
        return run(BlindContext(ctx, spec, cfg), cfg)

    return dispatched
