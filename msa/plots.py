"""Figures for people: recall curves and retrieval examples, saved as PNG artifacts."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def recall_curve(i2t_rank: torch.Tensor, t2i_rank: torch.Tensor, max_k: int = 50) -> dict[str, np.ndarray]:
    """R@K for K = 1..max_k in both directions (percent), from msa.metrics' ranks."""
    ks = torch.arange(1, max_k + 1, device=i2t_rank.device)
    return {
        "k": ks.cpu().numpy(),
        "i2t": (i2t_rank.unsqueeze(0) < ks.unsqueeze(1)).float().mean(1).mul(100).cpu().numpy(),
        "t2i": (t2i_rank.unsqueeze(0) < ks.unsqueeze(1)).float().mean(1).mul(100).cpu().numpy(),
    }


def plot_recall_curves(
    curve: dict[str, np.ndarray], history: list[dict[str, float]], path: str | Path, title: str
) -> Path:
    """Left: test R@K against K. Right: validation recalls per epoch (how selection saw training)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(curve["k"], curve["i2t"], label="image -> text")
    left.plot(curve["k"], curve["t2i"], label="text -> image")
    left.set(xlabel="K", ylabel="R@K (%)", title=f"{title}: test recall", ylim=(0, 100))
    left.grid(alpha=0.3)
    left.legend()
    if history:
        epochs = [h["epoch"] + 1 for h in history]
        for name in ("val_mR", "val_i2t_R1", "val_t2i_R1"):
            right.plot(epochs, [h[name] for h in history], marker="o", label=name)
    right.set(xlabel="epoch", ylabel="%", title="validation recall per epoch")
    right.grid(alpha=0.3)
    right.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def example_queries(n_captions: int, n_queries: int = 6) -> list[int]:
    """Caption indices evenly spread over a split, the queries the examples figure shows."""
    return np.linspace(0, n_captions - 1, num=min(n_queries, n_captions)).astype(int).tolist()


def plot_retrieval_examples(
    captions: list[str],
    targets: list[int],
    top: list[list[int]],
    images: Mapping[int, Image.Image],
    path: str | Path,
) -> Path:
    """One row per caption query with its top images (indices in ``top``); the right one framed green.

    ``images`` needs only the images that appear in ``top``, so a large split is never held in memory.
    """
    width = max(len(row) for row in top)
    fig, axes = plt.subplots(len(captions), width, figsize=(2.2 * width, 2.5 * len(captions)), squeeze=False)
    for row, (caption, target, ranked) in enumerate(zip(captions, targets, top)):
        for col, image_index in enumerate(ranked):
            ax = axes[row, col]
            ax.imshow(images[image_index])
            hit = image_index == target
            for spine in ax.spines.values():
                spine.set_edgecolor("limegreen" if hit else "lightgray")
                spine.set_linewidth(5 if hit else 1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"#{col + 1}" + ("  HIT" if hit else ""), fontsize=8)
        axes[row, 0].set_title(caption[:90], fontsize=8, loc="left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_ablation(
    rows: list[Mapping],
    path: str | Path,
    *,
    title: str,
    metric: str = "mR",
    chance: float | None = None,
) -> Path:
    """Per-variant mean ``metric`` with a +-1 standard deviation bar over seeds, each seed as a dot.

    ``rows`` are the per-variant entries of an ablation table (msa.runtime.ablation_table.ablation_table):
    ``variant``, ``mean``/``std`` dicts, ``by_seed`` (metric -> {seed: value}) and ``diff_mR`` (the paired
    difference to the first variant with its confidence interval, None for the first), which labels each bar.
    """
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(rows) + 1.5), 4.2))
    xs = np.arange(len(rows))
    means = [np.nan if row["mean"][metric] is None else row["mean"][metric] for row in rows]  # n=0: no bar
    stds = [row["std"][metric] or 0.0 for row in rows]
    ax.bar(xs, means, yerr=stds, capsize=6, color="#9ecae1", edgecolor="#3182bd", width=0.6,
           error_kw={"elinewidth": 1.5}, label=f"mean {metric} +- 1 sd over seeds")
    for x, row in zip(xs, rows):
        values = list(row["by_seed"][metric].values())
        offsets = np.linspace(-0.15, 0.15, num=len(values)) if len(values) > 1 else [0.0]
        ax.scatter(x + np.asarray(offsets), values, color="#08306b", s=14, zorder=3)
    if rows:
        ax.axhline(means[0], color="#3182bd", linestyle=":", linewidth=1)
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label=f"chance {metric} {chance:.2f}")
    labels = []
    for row in rows:
        diff = row.get("diff_mR")
        label = f"{row['variant']}\n(n={row['n']})"
        if diff is not None and diff.get("ci_low") is not None:
            label += f"\n{diff['mean']:+.2f} [{diff['ci_low']:+.2f}, {diff['ci_high']:+.2f}]"
        elif diff is not None and diff.get("mean") is not None:
            label += f"\n{diff['mean']:+.2f}"
        labels.append(label)
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set(ylabel=f"test {metric} (%)", title=title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
