"""Untargeted L-inf PGD, shared by the CL attack, AFT and PBE (docs/methods.md#aft).

Runs on the model in eval mode (BatchNorm uses running statistics) and restores the previous mode. Epsilon and
step size are in [0, 1] pixel units because every model normalises its input itself. Random start and clamping
to [0, 1] are on by default (a fix docs/methods.md#aft recommends: the official loop without them was numerically
unstable);
`random_start=False, clamp=False` reproduces the PBE code.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def pgd_untargeted(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    step_size: float,
    steps: int,
    random_start: bool = True,
    clamp: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return x_adv with ||x_adv - x||_inf <= eps that raises CE(model(x_adv), y). No gradient reaches the model."""
    was_training = model.training
    model.eval()
    x0 = x.detach()
    if random_start:
        noise = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_adv = x0 + (2 * noise - 1) * eps
    else:
        x_adv = x0.clone()
    if clamp:
        x_adv = x_adv.clamp(0, 1)
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(model(x_adv), y)
            (grad,) = torch.autograd.grad(loss, x_adv)
            with torch.no_grad():
                x_adv = x_adv + step_size * grad.sign()
                x_adv = torch.minimum(torch.maximum(x_adv, x0 - eps), x0 + eps)
                if clamp:
                    x_adv = x_adv.clamp(0, 1)
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)
    return x_adv.detach()
