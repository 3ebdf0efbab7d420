"""The evaluations' figures: depth x length heatmaps of the retrieval scores, and loss by token position.
PNGs are written under a temporary name and renamed, so a failed plot leaves no half-written image."""

from __future__ import annotations

import os
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters and CI
    from matplotlib import pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, out)
    return out


def heatmaps(summary: dict, title: str, out: Path) -> Path:
    """Exact and partial match, one panel each: depth (rows, 0 at the top) by length (columns)."""
    plt = _pyplot()
    lengths, depths = summary["lengths"], summary["depths"]
    fig, axes = plt.subplots(1, 2, figsize=(3 + 1.6 * len(lengths), 1.5 + 0.45 * len(depths)), squeeze=False,
                             constrained_layout=True)
    try:
        for ax, score in zip(axes[0], ("exact", "partial")):
            image = ax.imshow(summary[score], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
            ax.set_xlabel("prompt length (tokens)")
            ax.set_ylabel("needle depth (%)")
            ax.set_title(f"{score} match")
            for i, row in enumerate(summary[score]):
                for j, value in enumerate(row):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
        fig.suptitle(title, fontsize=10)
        return _save(fig, out)
    finally:
        plt.close(fig)


def loss_by_position(buckets: list[dict], title: str, out: Path) -> Path:
    """Mean loss per position bucket (at the bucket's middle position)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    try:
        middles = [(b["start"] + b["end"] - 1) / 2 for b in buckets]
        ax.plot(middles, [b["mean_loss"] for b in buckets], "o-", markersize=3)
        ax.set_xlabel("token position in the document")
        ax.set_ylabel("mean loss (nats)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        return _save(fig, out)
    finally:
        plt.close(fig)
