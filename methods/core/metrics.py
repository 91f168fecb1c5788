"""Every metric of the project, in one place (docs/methods.md#metrics).

- ACC: fraction of clean images classified as their true label.
- ASR: fraction of backdoor images (the trigger applied to every evaluation image whose true label differs from
  the target; under all2all every image, target (y+1) mod K) classified as the attack's target. Target-class
  images are excluded from the all2one/cleanLabel denominator.
- RA: fraction of the same backdoor images classified as their true label.
- DER: [max(0, ASR_before - ASR_after) - max(0, ACC_before - ACC_after) + 1] / 2, in [0, 1], against the
  attacked model's figures.
- Split quality, for any partition of the training set into pools (clean / poison / uncertain): precision and
  recall of the poison pool (how many of its members are truly poisoned; how many poisoned samples it caught),
  the same for the clean pool (against the truly clean samples), pool sizes, the poisoned fraction of the clean
  pool, and the AUROC of a per-sample score (higher = more suspicious) against the true poison flags.
"""

from __future__ import annotations

import numpy as np
import torch

POOL_CLEAN, POOL_POISON, POOL_UNCERTAIN = 0, 1, 2
POOL_NAMES = {POOL_CLEAN: "clean", POOL_POISON: "poison", POOL_UNCERTAIN: "uncertain"}


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    if labels.numel() == 0:
        return float("nan")
    return (predictions == labels).float().mean().item()


def der(acc_before: float, asr_before: float, acc_after: float, asr_after: float) -> float:
    return (max(0.0, asr_before - asr_after) - max(0.0, acc_before - acc_after) + 1.0) / 2.0


def _as_numpy(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def auroc(scores, flags) -> float:
    """Area under the ROC curve of `scores` separating flags==True from False (Mann-Whitney U, ties halved)."""
    s, f = _as_numpy(scores).astype(np.float64), _as_numpy(flags).astype(bool)
    n_pos, n_neg = int(f.sum()), int((~f).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_scores = s[order]
    # average ranks over ties
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(s)]])
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    return float((ranks[f].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _ratio(num: int, den: int) -> float:
    return float(num) / den if den else float("nan")


def split_metrics(pools, flags, scores=None) -> dict[str, float]:
    """Quality of a sample split against the true poison flags (pool codes: 0 clean, 1 poison, 2 uncertain)."""
    p, f = _as_numpy(pools).astype(np.int64), _as_numpy(flags).astype(bool)
    in_poison, in_clean = p == POOL_POISON, p == POOL_CLEAN
    out = {
        "split_poison_precision": _ratio(int((in_poison & f).sum()), int(in_poison.sum())),
        "split_poison_recall": _ratio(int((in_poison & f).sum()), int(f.sum())),
        "split_clean_precision": _ratio(int((in_clean & ~f).sum()), int(in_clean.sum())),
        "split_clean_recall": _ratio(int((in_clean & ~f).sum()), int((~f).sum())),
        "pool_clean_size": float(in_clean.sum()),
        "pool_poison_size": float(in_poison.sum()),
        "pool_clean_poisoned_frac": _ratio(int((in_clean & f).sum()), int(in_clean.sum())),
    }
    if scores is not None:
        out["split_auroc"] = auroc(scores, f)
    return out
