"""The comparison plots (matplotlib, Agg): one PNG per question, every variant on it.

* ``fvu_per_layer``: FVU per layer (and the spliced-in CE score per layer when computed);
* ``neff_hist``: functional coherence N_eff of the alive latents, one step histogram each;
* ``spread``: decoder-norm spread D_eff against contribution N_eff, one panel per variant
  (points above the diagonal write to more layers than they read from);
* ``probing_f1``: mean probing F1 against k, token and sequence tasks, with baselines.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from pipeline.evaluation.probe_suite import f1_by_k
from pipeline.evaluation.run_metrics import VariantResult
from pipeline.evaluation.splice import SpliceResult
from pipeline.paths import ReportPaths

DPI = 110


def layer_number(hook: str) -> int:
    """``blocks.12.hook_resid_post`` -> 12."""
    match = re.search(r"blocks\.(\d+)\.", hook)
    return int(match.group(1)) if match else -1


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def fvu_per_layer(results, hooks_of, splices, path: Path) -> Path:
    panels = 2 if splices else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    for res in results:
        name = res.variant.name
        layers = [layer_number(h) for h in hooks_of[name]]
        axes[0, 0].plot(layers, res.recon.fvu, marker="o", label=name)
        if splices and name in splices:
            axes[0, 1].plot(layers, splices[name].score, marker="o", label=name)
    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].set(xlabel="layer", ylabel="FVU (lower is better)", title="Reconstruction")
    axes[0, 0].set_ylim(bottom=0)
    axes[0, 0].legend(fontsize=8)
    if splices:
        axes[0, 1].set(
            xlabel="layer",
            ylabel="(CE_zero - CE_coder) / (CE_zero - CE_clean)",
            title="Spliced-in loss recovered",
        )
        axes[0, 1].axhline(1.0, color="grey", lw=0.8, ls="--")
        axes[0, 1].legend(fontsize=8)
    return _save(fig, path)


def neff_histogram(results, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    top = max(r.coherence.n_layers for r in results)
    bins = np.linspace(1, top, 4 * (top - 1) + 1) if top > 1 else np.linspace(0.5, 1.5, 3)
    for res in results:
        fc = res.coherence.fc[np.isfinite(res.coherence.fc)]
        if fc.size:
            label = f"{res.variant.name} (mean {fc.mean():.2f})"
            ax.hist(
                fc,
                bins=bins,
                weights=np.full(fc.size, 1 / fc.size),
                histtype="step",
                lw=1.6,
                label=label,
            )
    ax.set(
        xlabel="N_eff: layers a latent reads from (activation-weighted)",
        ylabel="share of alive latents",
        title="Functional coherence",
    )
    ax.legend(fontsize=8)
    return _save(fig, path)


def spread_scatter(results, path: Path) -> Path:
    n = len(results)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.9 * rows), squeeze=False)
    for ax, res in zip(axes.flat, results, strict=False):
        alive = res.sparsity.alive & np.isfinite(res.coherence.fc) & np.isfinite(res.d_eff)
        top = res.coherence.n_layers
        ax.scatter(res.coherence.fc[alive], res.d_eff[alive], s=6, alpha=0.5)
        ax.plot([1, top], [1, top], color="grey", lw=0.8, ls="--")
        ax.set(
            xlim=(0.9, top + 0.1),
            ylim=(0.9, top + 0.1),
            xlabel="N_eff (encoder contributions)",
            ylabel="D_eff (decoder norms)",
            title=res.variant.name,
        )
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("Decoder spread vs functional spread, per alive latent", fontsize=10)
    return _save(fig, path)


def probing_f1(results, probe_rows, baselines, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, task in zip(axes, ("token", "sequence"), strict=True):
        drawn = False
        for res in results:
            curve = f1_by_k(probe_rows, res.variant.name, task)
            if curve:
                ax.plot(list(curve), list(curve.values()), marker="o", label=res.variant.name)
                drawn = True
        for base in baselines:
            features = base.get("features", {}).get(task)
            if features is None:
                continue
            curve = f1_by_k(probe_rows, features, task)
            layer = features.split(" @ ")[-1]
            ax.plot(
                list(curve),
                list(curve.values()),
                ls="--",
                marker="x",
                label=f"{base['variant']} ({layer})",
            )
            drawn = True
        ax.set(
            xscale="log",
            xlabel="k (latents or dims kept)",
            ylabel="mean test F1",
            title=f"{task}-level probing",
            ylim=(0, 1.02),
        )
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(
                0.5,
                0.5,
                "no usable task on the evaluated tokens",
                ha="center",
                transform=ax.transAxes,
            )
    return _save(fig, path)


def write_plots(
    paths: ReportPaths,
    results: list[VariantResult],
    hooks_of: dict[str, list[str]],
    probe_rows: list[dict],
    baselines: list[dict],
    splices: dict[str, SpliceResult],
) -> dict[str, Path]:
    return {
        "fvu_per_layer": fvu_per_layer(results, hooks_of, splices, paths.plot("fvu_per_layer")),
        "neff_hist": neff_histogram(results, paths.plot("neff_hist")),
        "spread": spread_scatter(results, paths.plot("spread")),
        "probing_f1": probing_f1(results, probe_rows, baselines, paths.plot("probing_f1")),
    }
