"""CL (label-consistent backdoor; Turner, Tsipras, Madry, "Label-Consistent Backdoor Attacks", 2019): only
target-class images are poisoned and labels are unchanged; each chosen image is first made hard to classify by
untargeted PGD against a clean model (D-BR: eps 8/255, step 2/255, 4 steps, random start), then the four-corner
trigger is stamped. The clean model is the `badnets` recipe at poison rate 0 (`clean_epochs` epochs). Test
images get the trigger only. The clean model's accuracy on the hardened images, before the trigger goes on, is
reported as `cl_hardened_clean_acc`: near 1 means PGD left them easy and the attack has degenerated into
clean-label BadNets, which a model has no reason to learn."""

from __future__ import annotations

import torch

from methods.attacks.base import build_poisoned_data, run_attack, train_classifier
from methods.attacks.configs.cl import CLConfig
from methods.attacks.triggers import PatchTrigger, four_corner_pattern
from methods.core.method import register_method
from methods.core.metrics import accuracy
from methods.core.pgd import pgd_untargeted
from methods.core.training import predict_logits, to_float
from methods.data.configs import DatasetInfo
from methods.models.base import build_model


def make_cl_trigger(info: DatasetInfo, cfg: CLConfig, seed: int) -> PatchTrigger:
    mask, pattern = four_corner_pattern(info.channels, info.size)
    return PatchTrigger(
        {"channels": info.channels, "size": info.size, "pattern": "four_corner"}, {"mask": mask, "pattern": pattern}
    )


def train_clean_model(ctx, cfg: CLConfig, splits, trigger: PatchTrigger, seeds: dict[str, int]) -> torch.nn.Module:
    clean_cfg = cfg.replace(poison_rate=0.0, epochs=cfg.clean_epochs or cfg.epochs)
    clean_data = build_poisoned_data(splits, clean_cfg, trigger, seeds["poison_seed"]).to(ctx.device)
    torch.manual_seed(seeds["train_seed"])
    clean_model = build_model(cfg.model, splits.info).to(ctx.device)
    ctx.progress("CL: training the clean model that hardens the poisoned images")
    train_classifier(ctx, clean_model, clean_data, clean_cfg, seeds["train_seed"], report=False)
    return clean_model


def hardened_poison(ctx, cfg: CLConfig, splits, trigger: PatchTrigger, seeds: dict[str, int], facts: dict[str, float]):
    # The clean model is trained only when there are images to harden: a poison_rate 0 run (the clean
    # reference of this recipe) costs one training, not two.

    def poison_images(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        clean_model = train_clean_model(ctx, cfg, splits, trigger, seeds)
        device_g = torch.Generator(device=ctx.device).manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        adv = pgd_untargeted(
            clean_model,
            to_float(x.to(ctx.device)),
            y.to(ctx.device),
            cfg.pgd_eps,
            cfg.pgd_step_size,
            cfg.pgd_steps,
            random_start=True,
            generator=device_g,
        )
        hard = (adv * 255).round().clamp(0, 255).to(torch.uint8)
        # Measured on the uint8 images that are actually trained on, so rounding that undoes a tiny
        # perturbation counts as a failed hardening.
        with torch.no_grad():
            pred = predict_logits(clean_model, hard, cfg.eval_batch_size).argmax(1)
        facts["cl_hardened_clean_acc"] = accuracy(pred, y.to(ctx.device))
        ctx.progress(
            f"CL: the clean model classifies {facts['cl_hardened_clean_acc']:.3f} of the {len(y)} "
            f"hardened images correctly (pgd_eps {cfg.pgd_eps:.4g}, {cfg.pgd_steps} steps)"
        )
        stamped = trigger.apply(hard.cpu(), test=False)
        if cfg.trigger_amplitude >= 1.0:
            return stamped
        # Only the trigger's pixels differ between `stamped` and `hard`, so this moves them part of the way.
        mixed = hard.cpu().float() + cfg.trigger_amplitude * (stamped.float() - hard.cpu().float())
        return mixed.round().clamp(0, 255).to(torch.uint8)

    return poison_images


@register_method("cl")
def run(ctx, cfg: CLConfig):
    return run_attack(ctx, "cl", cfg, make_cl_trigger, poison_images_factory=hardened_poison)
