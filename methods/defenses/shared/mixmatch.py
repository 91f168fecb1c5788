"""MixMatch's pieces as pure functions on tensors: sharpening, generator-driven Beta/MixUp, interleaving, the
unlabeled-loss ramp and the two losses.

After Berthelot et al., "MixMatch: A Holistic Approach to Semi-Supervised Learning", NeurIPS 2019, as ASD
(Gao et al., CVPR 2023) uses it (docs/methods.md#asd). Nothing here is registered; `asd` calls it.

Beta sampling: torch.distributions cannot draw from an explicit torch.Generator, so a resumed run would not
repeat its MixUp coefficients. Beta(a, b) is therefore built here as X / (X + Y) of two Gamma variates drawn with
Marsaglia and Tsang's rejection method (ACM TOMS 2000) from `torch.randn`/`torch.rand` on the caller's generator.
Shapes below 1 use the boost Gamma(a) = Gamma(a + 1) * U^(1/a). The ratio is taken in log space (a sigmoid of
the log-difference), so small shapes, whose Gamma draws underflow, still give a valid Beta sample. Rejection
rounds are vectorised over all requested draws, which is why `mixup_lambdas` draws a whole epoch's coefficients
at once: the host checks acceptance once per round, never per training step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """p^(1/T) renormalised over the last dimension (T = 1 leaves p unchanged; T -> 0 tends to one-hot)."""
    if temperature <= 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    # In log space, so small probabilities raised to a large power do not underflow to an all-zero row.
    return torch.softmax(torch.log(p.clamp_min(1e-30)) / temperature, dim=-1)


def _log_gamma_samples(concentration: float, n: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """log of n Gamma(concentration, 1) variates (float64), Marsaglia-Tsang with the boost for shapes < 1."""
    boosted = concentration < 1.0
    d = (concentration + 1.0 if boosted else concentration) - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(n, dtype=torch.float64, device=device)
    missing = torch.ones(n, dtype=torch.bool, device=device)
    while bool(missing.any()):
        z = torch.randn(n, generator=g, device=device, dtype=torch.float64)
        u = torch.rand(n, generator=g, device=device, dtype=torch.float64)
        v = (1.0 + c * z) ** 3
        safe_v = v.clamp_min(1e-300)
        accept = (v > 0) & (torch.log(u) < 0.5 * z * z + d - d * safe_v + d * torch.log(safe_v))
        take = accept & missing
        out = torch.where(take, math.log(d) + torch.log(safe_v), out)
        missing = missing & ~accept
    if boosted:
        u = torch.rand(n, generator=g, device=device, dtype=torch.float64).clamp_min(1e-300)
        out = out + torch.log(u) / concentration
    return out


def sample_beta(
    alpha: float, beta: float, n: int, g: torch.Generator, device: torch.device | None = None
) -> torch.Tensor:
    """n draws of Beta(alpha, beta) (float32) from the generator `g` only."""
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"mixup_alpha: Beta parameters must be > 0, got ({alpha}, {beta})")
    device = torch.device(device) if device is not None else g.device
    log_x = _log_gamma_samples(alpha, n, g, device)
    log_y = _log_gamma_samples(beta, n, g, device)
    return torch.sigmoid(log_x - log_y).float()


def mixup_lambdas(alpha: float, n: int, g: torch.Generator, device: torch.device | None = None) -> torch.Tensor:
    """n MixUp coefficients lambda' = max(lambda, 1 - lambda), lambda ~ Beta(alpha, alpha): always in [0.5, 1],
    so every mixed sample stays closer to its own input (MixMatch keeps the labeled chunk mostly labeled)."""
    lam = sample_beta(alpha, alpha, n, g, device)
    return torch.maximum(lam, 1.0 - lam)


def mixup(
    x: torch.Tensor, targets: torch.Tensor, lam: torch.Tensor | float, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix every sample (and its soft target) with a random partner of the same batch:
    lam * own + (1 - lam) * partner, the partners a permutation drawn from `g`."""
    perm = torch.randperm(x.shape[0], generator=g, device=x.device)
    lam = torch.as_tensor(lam, dtype=x.dtype, device=x.device)
    mixed_x = lam * x + (1.0 - lam) * x[perm]
    mixed_t = lam * targets + (1.0 - lam) * targets[perm]
    return mixed_x, mixed_t


def _chunk_offsets(batch: int, groups: int) -> list[int]:
    """Boundaries splitting `batch` into `groups` near-equal slices."""
    sizes = [batch // groups] * groups
    for i in range(batch - sum(sizes)):
        sizes[-i - 1] += 1
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    return offsets


def interleave(chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Swap slices between equal-sized chunks so that each chunk holds a share of every original chunk:
    chunk 0's i-th slice trades places with chunk i's i-th slice. Forwarding the chunks one by one then
    gives BatchNorm batch statistics drawn from labeled and unlabeled samples alike, not one kind per pass.
    The swap is its own inverse (see `uninterleave`); every chunk keeps its size."""
    if not chunks:
        return []
    batch = chunks[0].shape[0]
    if any(c.shape[0] != batch for c in chunks):
        raise ValueError(f"interleave: chunks must have equal sizes, got {[c.shape[0] for c in chunks]}")
    offsets = _chunk_offsets(batch, len(chunks))
    parts = [[c[offsets[p] : offsets[p + 1]] for p in range(len(chunks))] for c in chunks]
    for i in range(1, len(chunks)):
        parts[i][i], parts[0][i] = parts[0][i], parts[i][i]
    return [torch.cat(p, dim=0) for p in parts]


def uninterleave(chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Undo `interleave` (outputs of the interleaved forward passes back to their own chunks)."""
    return interleave(chunks)


def ramp_weight(lambda_u: float, t: float | torch.Tensor, rampup: float) -> float | torch.Tensor:
    """lambda_u * clip(t / rampup, 0, 1): the unlabeled loss weight after t epochs (fractional epochs allowed)."""
    if rampup <= 0:
        return lambda_u * (1.0 if not isinstance(t, torch.Tensor) else torch.ones_like(t))
    if isinstance(t, torch.Tensor):
        return lambda_u * (t / rampup).clamp(0.0, 1.0)
    return lambda_u * min(max(t / rampup, 0.0), 1.0)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Lx: cross-entropy against soft targets, averaged over the batch."""
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


def squared_error(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Lu: mean over all (sample, class) entries of (softmax(logits) - target)^2."""
    return ((torch.softmax(logits, dim=1) - targets) ** 2).mean()
