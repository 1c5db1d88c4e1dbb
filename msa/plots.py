"""Figures for people: recall curves and retrieval examples, saved as PNG artifacts."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def recall_curve(sims: torch.Tensor, caption_image: torch.Tensor, max_k: int = 50) -> dict[str, np.ndarray]:
    """R@K for K = 1..max_k in both directions (percent), from the same ranks as msa.metrics."""
    sims = sims.float()
    n_images = sims.shape[0]
    own = sims.gather(0, caption_image.view(1, -1)).squeeze(0)
    t2i_rank = (sims > own.unsqueeze(0)).sum(0)
    best_own = torch.full((n_images,), float("-inf"), device=sims.device).scatter_reduce(
        0, caption_image, own, reduce="amax"
    )
    i2t_rank = (sims > best_own.unsqueeze(1)).sum(1)
    ks = torch.arange(1, max_k + 1, device=sims.device)
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


def plot_retrieval_examples(
    sims: torch.Tensor,
    caption_image: torch.Tensor,
    captions: list[str],
    images: list[Image.Image],
    path: str | Path,
    n_queries: int = 6,
    top_k: int = 5,
) -> Path:
    """Caption queries (evenly spread) with their top-K images; the right image framed green."""
    n_captions = sims.shape[1]
    queries = np.linspace(0, n_captions - 1, num=min(n_queries, n_captions)).astype(int)
    top = sims.float().topk(min(top_k, sims.shape[0]), dim=0).indices.T.cpu()
    fig, axes = plt.subplots(len(queries), top.shape[1], figsize=(2.2 * top.shape[1], 2.5 * len(queries)), squeeze=False)
    for row, q in enumerate(queries):
        target = int(caption_image[q])
        for col, image_index in enumerate(top[q].tolist()):
            ax = axes[row, col]
            ax.imshow(images[image_index])
            hit = image_index == target
            for spine in ax.spines.values():
                spine.set_edgecolor("limegreen" if hit else "lightgray")
                spine.set_linewidth(5 if hit else 1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"#{col + 1}" + ("  HIT" if hit else ""), fontsize=8)
        axes[row, 0].set_title(captions[q][:90], fontsize=8, loc="left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
