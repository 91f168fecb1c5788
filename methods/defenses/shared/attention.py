"""Attention-map distillation pieces shared by NAD and ARGD: attention maps, the AT loss, ARGD's vertex, edge and
cross-layer transfer terms, the transfer term's query/key heads, and batched Cutout.

Attention maps follow Zagoruyko & Komodakis ("Paying More Attention to Attention", ICLR 2017) as NAD uses them
(Li, Lyu, Koren, Lyu, Li, Ma, "Neural Attention Distillation: Erasing Backdoor Triggers from Deep Neural
Networks", ICLR 2021). The graph terms are those of ARGD (Xia, Wang, Ding, Wei, Chen, "Eliminating Backdoor
Triggers for Deep Neural Networks Using Attention Relation Graph Distillation", IJCAI 2022), whose transfer term
adapts the attention-based feature matching of AFD (Ji, Heo, Park, "Show, Attend and Distill", AAAI 2021).

Deviation from the official code: where a teacher and a student map have different resolutions (a WRN-40-2
teacher on a small_cnn student, whose stages pool earlier) the vertex term average-pools the larger map to the
smaller one, as the edge term already does between layers; the released code only ever pairs equal
resolutions, so on those it is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

EDGE_PAIRS = ((0, 1), (1, 2), (0, 2))


def attention_map(feature: torch.Tensor, p: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W): sum over channels of |F|^p, divided per sample by its L2 norm (+ eps)."""
    am = feature.abs().pow(p).sum(dim=1, keepdim=True)
    norm = torch.linalg.vector_norm(am, dim=(2, 3), keepdim=True)
    return am / (norm + eps)


def _to_common_size(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool whichever map is larger down to the other's H x W."""
    if a.shape[-2:] == b.shape[-2:]:
        return a, b
    if a.shape[-2] * a.shape[-1] > b.shape[-2] * b.shape[-1]:
        return F.adaptive_avg_pool2d(a, b.shape[-2:]), b
    return a, F.adaptive_avg_pool2d(b, a.shape[-2:])


def at_loss(a_student: torch.Tensor, a_teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of two attention maps (the teacher's carries no gradient)."""
    a_s, a_t = _to_common_size(a_student, a_teacher.detach())
    return (a_s - a_t).pow(2).mean()


def weighted_at_loss(
    maps_student: Sequence[torch.Tensor], maps_teacher: Sequence[torch.Tensor], weights: Sequence[float]
) -> torch.Tensor:
    """sum_i w_i * AT(A_s_i, A_t_i): NAD's loss with its betas, and ARGD's vertex loss with its vertex weights."""
    if not (len(maps_student) == len(maps_teacher) == len(weights)):
        raise ValueError(
            f"expected as many weights ({len(weights)}) as student ({len(maps_student)}) "
            f"and teacher ({len(maps_teacher)}) maps"
        )
    return sum(w * at_loss(s, t) for w, s, t in zip(weights, maps_student, maps_teacher))


def edge_distances(maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer pair (1,2), (2,3), (1,3): each sample's squared distance between the two maps (the larger one
    pooled to the smaller's resolution), divided by the batch maximum."""
    out = []
    for i, j in EDGE_PAIRS:
        a, b = _to_common_size(maps[i], maps[j])
        d = (a - b).pow(2).flatten(1).sum(1).clamp(min=1e-12)
        out.append(d / d.max())
    return out


def edge_loss(maps_student: Sequence[torch.Tensor], maps_teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over the three layer pairs of the MSE between student and teacher normalised distances."""
    d_s = edge_distances(maps_student)
    d_t = edge_distances([m.detach() for m in maps_teacher])
    return sum(F.mse_loss(s, t) for s, t in zip(d_s, d_t)) / len(EDGE_PAIRS)


class TransferHeads(nn.Module):
    """ARGD's cross-layer transfer term: each teacher layer attends over the student layers.

    Query of teacher layer t: Linear(1 -> qk_dim) + BN on the spatial mean of its attention map (no ReLU).
    Key of student layer s: Linear(1 -> qk_dim) + BN + ReLU on its map's spatial mean, then a shared "bilinear"
    Linear(qk_dim -> qk_dim * n_teacher) + BN giving one key per teacher layer. Logit(t, s) = (<key_st, query_t>
    + P_t . P_s) / sqrt(qk_dim) with Xavier-initialised position vectors; softmax over s. Values: the squared
    maps flattened and L2-normalised, the student's average-pooled (or replicated) to teacher t's H x W.
    """

    def __init__(self, n_teacher: int = 3, n_student: int = 3, qk_dim: int = 128) -> None:
        super().__init__()
        self.n_teacher, self.n_student, self.qk_dim = n_teacher, n_student, qk_dim
        self.query = nn.ModuleList(
            nn.Sequential(nn.Linear(1, qk_dim), nn.BatchNorm1d(qk_dim)) for _ in range(n_teacher)
        )
        self.key = nn.ModuleList(
            nn.Sequential(nn.Linear(1, qk_dim), nn.BatchNorm1d(qk_dim), nn.ReLU()) for _ in range(n_student)
        )
        self.bilinear = nn.Sequential(nn.Linear(qk_dim, qk_dim * n_teacher), nn.BatchNorm1d(qk_dim * n_teacher))
        self.pos_teacher = nn.Parameter(torch.empty(n_teacher, qk_dim))
        self.pos_student = nn.Parameter(torch.empty(n_student, qk_dim))
        nn.init.xavier_normal_(self.pos_teacher)
        nn.init.xavier_normal_(self.pos_student)

    def attention(self, maps_student: Sequence[torch.Tensor], maps_teacher: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, n_teacher, n_student) weights, each row a softmax over the student layers."""
        b = maps_student[0].shape[0]
        queries = torch.stack([q(m.mean(dim=(2, 3))) for q, m in zip(self.query, maps_teacher)], dim=1)  # B,T,Q
        keys = torch.stack([k(m.mean(dim=(2, 3))) for k, m in zip(self.key, maps_student)], dim=1)  # B,S,Q
        keys = self.bilinear(keys.reshape(b * self.n_student, self.qk_dim))
        keys = keys.view(b, self.n_student, self.n_teacher, self.qk_dim)
        logits = torch.einsum("bstq,btq->bts", keys, queries) + self.pos_teacher @ self.pos_student.T
        return F.softmax(logits / math.sqrt(self.qk_dim), dim=2)

    def forward(self, maps_student: Sequence[torch.Tensor], maps_teacher: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(maps_student) != self.n_student or len(maps_teacher) != self.n_teacher:
            raise ValueError(
                f"TransferHeads built for {self.n_student} student / {self.n_teacher} teacher maps, "
                f"got {len(maps_student)} / {len(maps_teacher)}"
            )
        maps_teacher = [m.detach() for m in maps_teacher]
        weights = self.attention(maps_student, maps_teacher)
        loss = maps_student[0].new_zeros(())
        for t, a_t in enumerate(maps_teacher):
            size = a_t.shape[-2:]
            v_t = F.normalize(a_t.pow(2).flatten(1), dim=1)  # B, HW
            v_s = torch.stack(
                [F.normalize(F.adaptive_avg_pool2d(a_s.pow(2), size).flatten(1), dim=1) for a_s in maps_student], dim=1
            )  # B, S, HW
            per_layer = (v_s - v_t[:, None]).pow(2).mean(dim=2)  # B, S
            loss = loss + (weights[:, t] * per_layer).sum(dim=1).mean()
        return loss


def cutout(x: torch.Tensor, length: int, g: torch.Generator) -> torch.Tensor:
    """One zeroed square hole per image, centred uniformly over the image and clipped at its border. As in the
    reference Cutout (DeVries & Taylor 2017) the half-length is floored, so length 3 cuts a 2 x 2 hole."""
    half = length // 2
    if half <= 0:
        return x
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b, 1), generator=g, device=x.device)
    cx = torch.randint(0, w, (b, 1), generator=g, device=x.device)
    rows = torch.arange(h, device=x.device)[None]
    cols = torch.arange(w, device=x.device)[None]
    in_rows = (rows >= cy - half) & (rows < cy + half)  # B, H
    in_cols = (cols >= cx - half) & (cols < cx + half)  # B, W
    hole = in_rows[:, :, None] & in_cols[:, None, :]
    return x.masked_fill(hole[:, None], 0.0)
