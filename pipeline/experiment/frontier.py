"""The sparsity sweep's L0-FVU frontier: one PNG per variant (matplotlib, Agg).

Points are each run's final held-out check (``val_l0``, ``val_fvu`` on the validation
split, seed 0): the sweep runs plus the variant's own seed-0 run at its manifest's k.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def plot_frontier(variant: str, points: list[dict], path: Path) -> Path:
    """``points``: ``{"k", "val_l0", "val_fvu"}`` dicts; drawn in order of L0."""
    points = sorted(points, key=lambda p: p["val_l0"])
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot([p["val_l0"] for p in points], [p["val_fvu"] for p in points], marker="o")
    for p in points:
        ax.annotate(f"k={p['k']}", (p["val_l0"], p["val_fvu"]), fontsize=8,
                    textcoords="offset points", xytext=(4, 4))  # fmt: skip
    ax.set_xlabel("L0 (active latents per token, validation split)")
    ax.set_ylabel("FVU (mean of per-layer FVU, validation split)")
    ax.set_title(f"L0-FVU frontier: {variant} (seed 0)")
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
