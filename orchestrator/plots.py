"""Every PNG the project draws: per-epoch curves, trigger and sample grids, the FCT histogram, ASD's clean-pool
composition, a sweep's Pareto front. methods/ hands over arrays; only this module draws."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _image_grid(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) uint8 -> one row image (H, N*W[, 3])."""
    n, c, h, w = images.shape
    row = images.transpose(2, 0, 3, 1).reshape(h, n * w, c)
    return row[..., 0] if c == 1 else row


def trigger_png(path: Path, pattern: np.ndarray) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(2.5, 2.5))
    img = pattern.transpose(1, 2, 0)
    ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_title("trigger on a grey image", fontsize=8)
    ax.axis("off")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def amplified_difference(clean: np.ndarray, poisoned: np.ndarray) -> tuple[np.ndarray, float]:
    """|poisoned - clean| scaled so its largest value is white: the only way to see a WaNet warp or a faint SIG
    signal. Returns the uint8 images and the gain used."""
    diff = np.abs(poisoned.astype(np.int16) - clean.astype(np.int16)).astype(np.float32)
    peak = float(diff.max())
    gain = 255.0 / peak if peak > 0 else 1.0
    return np.clip(diff * gain, 0, 255).astype(np.uint8), gain


def samples_png(path: Path, clean: np.ndarray, poisoned: np.ndarray) -> None:
    plt = _plt()
    diff, gain = amplified_difference(clean, poisoned)
    fig, axes = plt.subplots(3, 1, figsize=(1.2 * len(clean), 4.5))
    for ax, images, title in zip(
        axes, (clean, poisoned, diff), ("clean", "poisoned", f"|poisoned - clean| x {gain:.1f}")
    ):
        ax.imshow(_image_grid(images), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def curves_png(path: Path, history: Sequence[tuple[int, dict[str, float]]], title: str = "") -> bool:
    """ACC / ASR / RA per step, validation dashed and test solid. Returns False when there is nothing to draw."""
    keys = [k for k in ("acc", "asr", "ra") if any(f"test_{k}" in m for _, m in history)]
    if not keys:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k, colour in zip(keys, ("tab:blue", "tab:red", "tab:green")):
        for split, style in (("val", "--"), ("test", "-")):
            pts = [(s, m[f"{split}_{k}"]) for s, m in history if f"{split}_{k}" in m]
            if pts:
                ax.plot(*zip(*pts), style, color=colour, label=f"{split} {k.upper()}")
    ax.set_xlabel("step (epoch / round)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def score_histogram_png(path: Path, scores: np.ndarray, flags: np.ndarray, title: str = "FCT score") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.histogram_bin_edges(scores, bins=40)
    ax.hist(scores[~flags], bins=bins, alpha=0.6, label=f"clean ({int((~flags).sum())})", color="tab:blue")
    ax.hist(scores[flags], bins=bins, alpha=0.6, label=f"poisoned ({int(flags.sum())})", color="tab:red")
    ax.set_xlabel(title)
    ax.set_ylabel("training images")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def pool_composition_png(path: Path, series: dict[str, list[float]]) -> bool:
    """ASD: the clean pool's size and the poisoned images inside it, per epoch."""
    epochs = series.get("epoch")
    size = series.get("clean_pool_size")
    poisoned = series.get("clean_pool_poisoned")
    if not epochs or size is None or poisoned is None:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    clean = np.asarray(size) - np.asarray(poisoned)
    ax.stackplot(
        epochs, clean, poisoned, labels=["clean images", "poisoned images"], colors=["tab:blue", "tab:red"], alpha=0.7
    )
    if "stage" in series:
        for e, (a, b) in zip(epochs[1:], zip(series["stage"], series["stage"][1:])):
            if a != b:
                ax.axvline(e, color="k", ls=":", lw=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("clean pool")
    ax.legend(fontsize=8, loc="upper left")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated when maximising the first value and minimising the second."""
    front = []
    for i, (acc, asr) in enumerate(points):
        dominated = any((a >= acc and s <= asr) and (a > acc or s < asr) for j, (a, s) in enumerate(points) if j != i)
        if not dominated and not (np.isnan(acc) or np.isnan(asr)):
            front.append(i)
    return front


def pareto_png(path: Path, points: Sequence[tuple[float, float]]) -> None:
    plt = _plt()
    front = set(pareto_front(points))
    fig, ax = plt.subplots(figsize=(5, 4))
    xs, ys = zip(*points) if points else ((), ())
    ax.scatter(ys, xs, c=["tab:red" if i in front else "tab:gray" for i in range(len(points))], s=30)
    ordered = sorted((points[i][1], points[i][0]) for i in front)
    if ordered:
        ax.plot(*zip(*ordered), "r-", lw=1, label="Pareto front")
        ax.legend(fontsize=8)
    ax.set_xlabel("val ASR (lower is better)")
    ax.set_ylabel("val ACC (higher is better)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def roc_pr_png(path: Path, scores: np.ndarray, flags: np.ndarray, title: str) -> bool:
    """ROC and precision-recall curves of a per-sample suspicion score against the true poison flags."""
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    if flags.all() or not flags.any():
        return False
    plt = _plt()
    fpr, tpr, _ = roc_curve(flags, scores)
    precision, recall, _ = precision_recall_curve(flags, scores)
    fig, (left, right) = plt.subplots(1, 2, figsize=(7, 3.2))
    left.plot(fpr, tpr, color="tab:blue")
    left.plot([0, 1], [0, 1], ":", color="grey")
    left.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC (AUROC {auc(fpr, tpr):.3f})")
    right.plot(recall, precision, color="tab:red")
    right.axhline(flags.mean(), ls=":", color="grey")
    right.set(xlabel="recall", ylabel="precision", title=f"PR (AUPRC {auc(recall, precision):.3f})")
    for ax in (left, right):
        ax.title.set_fontsize(9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def confusion_png(path: Path, matrices: dict[str, np.ndarray]) -> None:
    """Row-normalised confusion matrices (true class x predicted class), e.g. on clean and on triggered images."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(matrices), figsize=(3.6 * len(matrices), 3.4), squeeze=False)
    for ax, (title, matrix) in zip(axes[0], matrices.items()):
        rows = matrix.sum(axis=1, keepdims=True)
        shown = np.divide(matrix, rows, out=np.zeros_like(matrix, dtype=float), where=rows > 0)
        ax.imshow(shown, cmap="Blues", vmin=0, vmax=1)
        ax.set(xlabel="predicted", ylabel="true", title=title)
        ax.title.set_fontsize(9)
        if len(matrix) <= 12:
            ax.set_xticks(range(len(matrix)))
            ax.set_yticks(range(len(matrix)))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def search_history_png(path: Path, values: Sequence[float], mode: str, metric: str) -> None:
    """A sweep's objective per trial in the order the searcher proposed them, with the best so far."""
    plt = _plt()
    best, running = [], None
    for v in values:
        if not np.isnan(v):
            running = v if running is None else (max(running, v) if mode == "max" else min(running, v))
        best.append(np.nan if running is None else running)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(range(1, len(values) + 1), values, "o", color="tab:blue", label="trial")
    ax.plot(range(1, len(values) + 1), best, "-", color="tab:red", label=f"best so far ({mode})")
    ax.set(xlabel="trial (proposal order)", ylabel=metric, title="optimisation history")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def importance_png(path: Path, importances: dict[str, float], metric: str) -> None:
    """How much of the objective's variation each searched parameter explains (fANOVA over the sweep's trials)."""
    plt = _plt()
    names = sorted(importances, key=importances.get)
    fig, ax = plt.subplots(figsize=(5, 0.35 * len(names) + 1.2))
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set(xlabel=f"importance for {metric}", title="parameter importance")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_handoffs(
    directory: Path, tables: dict[str, dict[str, Any]], series: dict[str, dict[str, list]], method: str
) -> list[Path]:
    """The plots that come from methods' hand-offs: FCT / score histograms and ASD's pools."""
    out = []
    directory.mkdir(parents=True, exist_ok=True)
    scores = tables.get("scores")
    if scores is not None and len(scores.get("score", [])):
        name = "fct_hist.png" if method in ("sd", "dbr", "dst") else "score_hist.png"
        score_histogram_png(
            directory / name,
            np.asarray(scores["score"], dtype=float),
            np.asarray(scores["true_poisoned"], dtype=bool),
            "FCT score" if name == "fct_hist.png" else f"{method} score",
        )
        out.append(directory / name)
        if roc_pr_png(
            directory / "roc_pr.png",
            np.asarray(scores["score"], dtype=float),
            np.asarray(scores["true_poisoned"], dtype=bool),
            f"{method}: poisoned vs clean training samples",
        ):
            out.append(directory / "roc_pr.png")
    pools = series.get("asd_pools")
    if pools and pool_composition_png(directory / "asd_pools.png", pools):
        out.append(directory / "asd_pools.png")
    return out
