"""The comparison plots (matplotlib, Agg): one PNG per question, every variant on it.

* ``fvu_per_layer``: FVU per layer (and the spliced-in CE score per layer when computed);
* ``neff_hist``: functional coherence N_eff of the alive latents, one step histogram each;
* ``spread``: decoder-norm spread D_eff against contribution N_eff, one panel per variant
  (points above the diagonal write to more layers than they read from);
* ``probing_f1``: mean probing F1 against k, token and sequence tasks, with baselines;
* ``training``: loss, FVU and L0 against step from each run's ``metrics.jsonl``;
* ``l0_fvu``: held-out L0 against FVU, one point per variant (the sparsity frontier);
* ``trajectories``: decoder top-2 energy share and adjacent-layer cosine of the alive
  latents of every multi-layer variant (``pipeline.evaluation.trajectories``).

Every axis carries a label with its unit, and every figure a title.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import json

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from pipeline.evaluation.probe_suite import f1_by_k
from pipeline.evaluation.run_metrics import VariantResult
from pipeline.evaluation.splice import SpliceResult
from pipeline.paths import ReportPaths, RunPaths

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
    axes[0, 0].set(
        xlabel="layer (block index)",
        ylabel="FVU (fraction of variance unexplained)",
        title="Reconstruction per layer, held-out tokens",
    )
    axes[0, 0].set_ylim(bottom=0)
    axes[0, 0].legend(fontsize=8)
    if splices:
        axes[0, 1].set(
            xlabel="layer (block index)",
            ylabel="CE score: (CE_zero - CE_coder) / (CE_zero - CE_clean)",
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
        xlabel="N_eff: layers a latent reads from (activation-weighted, count of layers)",
        ylabel="share of alive latents (fraction)",
        title="Functional coherence of alive latents",
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
            xlabel="N_eff: layers read (encoder contributions)",
            ylabel="D_eff: layers written (decoder norms)",
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
            xlabel="k: latents or residual dims kept (log scale)",
            ylabel="mean test F1 over concepts (0-1)",
            title=f"{task}-level sparse probing",
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


def read_metrics_log(run_dir: Path) -> list[dict]:
    """The training log of a run (``metrics.jsonl``): one dict per logged step; [] if none."""
    path = RunPaths(Path(run_dir)).metrics
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


TRAINING_PANELS = (
    ("loss", None, "training loss (reconstruction + penalties)"),
    ("fvu", "val_fvu", "FVU (fraction of variance unexplained)"),
    ("l0", "val_l0", "L0 (active latents per token)"),
)


def training_curves(logs: dict[str, list[dict]], path: Path) -> Path:
    """Loss, FVU and L0 against step for every run (solid: training batches; dashed with
    markers: the held-out validation pass, where logged)."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (key, val_key, label) in zip(axes, TRAINING_PANELS, strict=True):
        for i, (name, rows) in enumerate(logs.items()):
            colour = f"C{i % 10}"
            train = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if train:
                dots = "." if len(train) < 30 else None  # a short log would draw no line
                ax.plot(*zip(*train, strict=True), color=colour, lw=1.2, marker=dots, label=name)
            if val_key:
                val = [(r["step"], r[val_key]) for r in rows if r.get(val_key) is not None]
                if val:
                    ax.plot(*zip(*val, strict=True), color=colour, ls="--", marker=".", lw=0.8)
        ax.set(xlabel="training step (batches)", ylabel=label, title=f"Training: {key}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if key == "loss":
            ax.set_yscale("log")
            ax.set_ylabel(f"{label}, log scale")
    if not any(logs.values()):
        axes[0].text(0.5, 0.5, "no metrics.jsonl found", ha="center", transform=axes[0].transAxes)
    else:
        axes[0].legend(fontsize=7)
    return _save(fig, path)


def l0_fvu(summaries: list[dict], path: Path) -> Path:
    """Held-out L0 against FVU, one labelled point per variant: lower-left is better."""
    fig, ax = plt.subplots(figsize=(6.5, 4.6))
    points = [
        (row["variant"], row["l0"], row["fvu"])
        for row in summaries
        if row.get("l0") is not None and row.get("fvu") is not None
    ]
    for i, (name, l0, fvu) in enumerate(points):
        ax.scatter([l0], [fvu], color=f"C{i % 10}", s=40, label=name, zorder=3)
        ax.annotate(name, (l0, fvu), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set(
        xlabel="L0: active latents per token (held-out mean)",
        ylabel="FVU (fraction of variance unexplained, mean over layers)",
        title="Sparsity-reconstruction trade-off (lower-left is better)",
    )
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=0)
    if points:
        ax.legend(fontsize=7)
    return _save(fig, path)


TRAJECTORY_PANELS = (
    ("top2", "decoder energy share in the top 2 singular directions (fraction)", (0, 1)),
    ("adjacent_cos", "decoder cosine between adjacent carrying layers (mean per latent)", (-1, 1)),
)


def trajectories(results, path: Path) -> Path:
    """Step histograms of two trajectory statistics per multi-layer variant (alive latents)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    drawn = False
    for ax, (stat, label, limits) in zip(axes, TRAJECTORY_PANELS, strict=True):
        bins = np.linspace(*limits, 41)
        for res in results:
            if res.trajectories is None:
                continue
            values = res.trajectories["dec"].columns()[stat][res.sparsity.alive]
            values = values[np.isfinite(values)]
            if values.size:
                weights = np.full(values.size, 1 / values.size)
                label_v = f"{res.variant.name} (median {np.median(values):.2f})"
                ax.hist(values, bins=bins, weights=weights, histtype="step", lw=1.4, label=label_v)
                drawn = True
        ylabel = "share of alive latents (fraction)"
        ax.set(xlabel=label, ylabel=ylabel, title=f"Trajectory: {stat}")
        if drawn:
            ax.legend(fontsize=7)
    if not drawn:
        axes[0].text(0.5, 0.5, "no multi-layer variant", ha="center", transform=axes[0].transAxes)
    return _save(fig, path)


def write_plots(
    paths: ReportPaths,
    results: list[VariantResult],
    hooks_of: dict[str, list[str]],
    probe_rows: list[dict],
    baselines: list[dict],
    splices: dict[str, SpliceResult],
    summaries: list[dict] | None = None,
) -> dict[str, Path]:
    logs = {r.variant.name: read_metrics_log(r.variant.run_dir) for r in results}
    return {
        "fvu_per_layer": fvu_per_layer(results, hooks_of, splices, paths.plot("fvu_per_layer")),
        "l0_fvu": l0_fvu(summaries or [], paths.plot("l0_fvu")),
        "training": training_curves(logs, paths.plot("training")),
        "neff_hist": neff_histogram(results, paths.plot("neff_hist")),
        "spread": spread_scatter(results, paths.plot("spread")),
        "probing_f1": probing_f1(results, probe_rows, baselines, paths.plot("probing_f1")),
        "trajectories": trajectories(results, paths.plot("trajectories")),
    }
