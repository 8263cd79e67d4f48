"""The report's plots (matplotlib, Agg), drawn from the saved report tables alone
(``results.json`` and the Parquet tables), so that ``pipeline report`` redraws a committed
report without its runs. Runs are folded into variants by their protocol labels
(``run_labels``; ``pipeline run`` records them): seeds of a variant give one mean ± sd, an
untrained control sits beside its variant, never in its own curve.

* ``verdict``: the paper's effects (FVU, probing F1, N_eff, coherent latents), one panel
  each, every trained variant with its untrained control: the report's first figure;
* ``fvu_per_layer``: FVU per layer (and the spliced-in CE score per layer when computed);
* ``probing_f1``: mean probing F1 against k, token and sequence tasks, with baselines;
* ``l0_fvu``: held-out L0 against FVU per variant (the sparsity frontier), labelled directly;
* ``neff_hist``: functional coherence N_eff of the alive latents, one step histogram each;
* ``spread``: decoder-norm spread D_eff against contribution N_eff, one panel per variant;
* ``trajectories``: decoder top-2 energy share and adjacent-layer cosine of alive latents;
* ``training``: loss, FVU and L0 against step (the runs' ``metrics.jsonl``, saved as
  ``training.parquet``).

Every axis carries a label with its unit, every figure a title, and every legend sits
outside the axes: each PNG has a ``<name>.layout.json`` beside it with the pixel boxes of
its axes and legends, which the browser test checks for overlap.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pyarrow.parquet as pq
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from pipeline.evaluation.probe_suite import f1_by_k
from pipeline.evaluation.results import write_table
from pipeline.evaluation.run_metrics import VariantResult
from pipeline.paths import ReportPaths, RunPaths

DPI = 110
WIDE = 11.0  # inches: a full-width figure (1,210 px at DPI)
PROBE_K = 5  # the probing budget of the report's F1 column (the table's: largest k <= 10)
TRAINING_KEYS = ("step", "loss", "fvu", "l0", "val_fvu", "val_l0")
BEST_LAYER = " (best layer)"
KIND_COLOURS = {"crosscoder": "C0", "fmxcoder": "C1", "per_layer_sae": "C2"}


def layer_number(hook: str) -> int:
    """``blocks.12.hook_resid_post`` -> 12."""
    match = re.search(r"blocks\.(\d+)\.", hook)
    return int(match.group(1)) if match else -1


@dataclass(frozen=True)
class Label:
    """Where a run belongs: its variant, its role (trained, control, baseline), its seed."""

    variant: str
    role: str
    seed: int | None


def _own_label(row: dict) -> Label:
    """A run's ``protocol`` record (what ``pipeline run`` labels it), else the run alone:
    its own variant, a control when it has zero training steps, no seed. Names are never
    parsed: a reused sweep run is named ``<variant> lr=<lr>`` and is still seed 0."""
    protocol = row.get("protocol")
    if protocol:
        return Label(protocol["variant"], protocol["role"], protocol.get("seed"))
    return Label(row["variant"], "control" if row.get("step") == 0 else "trained", None)


def run_labels(rows: list[dict]) -> list[Label]:
    """Each summary row's label. A best-layer SAE baseline (``<run> (best layer)``) follows
    the run it was chosen from: one baseline group per variant and role, that run's seed."""
    own = {r["variant"]: _own_label(r) for r in rows if r.get("kind") != "baseline"}
    labels = []
    for row in rows:
        name = row["variant"]
        owner = own.get(name.removesuffix(BEST_LAYER)) if name.endswith(BEST_LAYER) else None
        if row.get("kind") != "baseline":
            labels.append(own[name])
        elif owner is None:
            labels.append(Label(name, "baseline", None))
        else:
            untrained = " untrained" if owner.role == "control" else ""
            labels.append(Label(f"{owner.variant}{untrained}{BEST_LAYER}", "baseline", owner.seed))
    return labels


def read_summary(paths: ReportPaths, labels: dict[str, dict] | None = None) -> dict:
    """``results.json``; with ``labels`` (run id -> protocol record, as ``protocol.json``
    holds them) each run's ``protocol`` is set from them in memory, for a report evaluated
    before its runs were labelled. The file is not rewritten."""
    summary = json.loads(paths.summary.read_text())
    for row in summary["variants"] if labels else []:
        row["protocol"] = labels.get(row.get("run_dir")) or row.get("protocol")
    return summary


def probe_f1(row: dict, k: int = PROBE_K) -> float:
    """Mean of the token- and sequence-level mean F1 at ``k`` (the comparison table's)."""
    values = [row.get(f"{task}_f1_k{k}") for task in ("token", "sequence")]
    finite = [float(v) for v in values if _finite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def with_derived(row: dict) -> dict:
    """A summary row plus ``probe_f1`` and ``coherent`` (share of the rated latents)."""
    rated = row.get("judge_rated")
    coherent = row["judge_good"] / rated if rated and row.get("judge_good") is not None else None
    return {**row, "probe_f1": probe_f1(row), "coherent": coherent}


@dataclass
class Group:
    """The runs of one variant in one role (its seeds)."""

    variant: str
    role: str
    kind: str
    runs: list[dict] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [r["variant"] for r in self.runs]

    def mean_sd(self, key: str) -> tuple[float, float]:
        """Mean and sample sd over seeds of a finite column (nan, nan when none is)."""
        values = [float(r[key]) for r in self.runs if _finite(r.get(key))]
        if not values:
            return math.nan, math.nan
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return statistics.fmean(values), sd


def group_runs(rows: list[dict]) -> list[Group]:
    """Summary rows folded by (variant, role), in the order variants first appear."""
    groups: dict[tuple[str, str], Group] = {}
    for row, label in zip(rows, run_labels(rows), strict=True):
        key = (label.variant, label.role)
        groups.setdefault(key, Group(label.variant, label.role, row.get("kind", ""))).runs.append(
            with_derived(row)
        )
    return list(groups.values())


def _role(groups: list[Group], role: str) -> list[Group]:
    return [g for g in groups if g.role == role]


def _colours(groups: list[Group]) -> dict[str, str]:
    """One colour per trained variant, the same in every figure."""
    return {g.variant: f"C{i % 10}" for i, g in enumerate(_role(groups, "trained"))}


@dataclass
class Tables:
    """What a report directory saved: the summary and the long tables, as row lists."""

    summary: dict
    groups: list[Group]
    per_layer: list[dict]
    latents: list[dict]
    probing: list[dict]
    training: list[dict]

    def runs_of(self, rows: list[dict], group: Group) -> dict[str, list[dict]]:
        names = set(group.names)
        out: dict[str, list[dict]] = {name: [] for name in group.names}
        for row in rows:
            if row["variant"] in names:
                out[row["variant"]].append(row)
        return out


def read_rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist() if path.is_file() else []


def load_tables(paths: ReportPaths, labels: dict[str, dict] | None = None) -> Tables:
    summary = read_summary(paths, labels)
    rows = summary["variants"] + summary.get("baselines", [])
    return Tables(
        summary,
        group_runs(rows),
        read_rows(paths.table("per_layer")),
        read_rows(paths.table("latents")),
        read_rows(paths.table("probing")),
        read_rows(paths.table("training")),
    )


def _layout(fig) -> dict:
    """Pixel boxes ``[x0, y0, x1, y1]`` (origin bottom left) of the visible axes and of every
    legend, as in the saved PNG."""
    fig.canvas.draw()

    def box(artist) -> list[float]:
        return [round(float(v), 1) for v in artist.get_window_extent().extents]

    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    return {
        "size": [round(float(v), 1) for v in fig.bbox.size],
        "axes": [box(ax) for ax in fig.axes if ax.get_visible() and ax.axison],
        "legends": [box(legend) for legend in legends],
    }


def layout_path(png: Path) -> Path:
    return png.with_suffix(".layout.json")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    layout = _layout(fig)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    layout_path(path).write_text(json.dumps(layout) + "\n")
    return path


def _figure(rows: int, cols: int, width: float, height: float, **kw):
    """A constrained-layout figure at the report's DPI (so layout boxes are PNG pixels)."""
    return plt.subplots(
        rows, cols, figsize=(width, height), dpi=DPI, squeeze=False, layout="constrained", **kw
    )


def _outside_legend(fig, **kw) -> None:
    """The figure's legend to the right of every axes (never on the data); none when
    nothing was drawn."""
    if any(ax.get_legend_handles_labels()[0] for ax in fig.axes):
        fig.legend(loc="outside right upper", fontsize=8, frameon=False, **kw)


EFFECTS = (
    ("fvu", "Reconstruction (lower is better)", "FVU, held-out (fraction)", 3),
    ("probe_f1", f"Probing F1 at k={PROBE_K} (higher is better)", "mean test F1 (0-1)", 3),
    ("fc", "Layers driving a latent (N_eff)", "N_eff (layers, activation-weighted)", 2),
    ("coherent", "Coherent latents (higher is better)", "share of sampled latents", 2),
)


def _verdict_points(ax, key: str, digits: int, trained: list[Group], controls: dict) -> None:
    """One row per trained variant: its mean ± sd, labelled, and its control just below."""
    for y, g in enumerate(trained):
        mean, sd = g.mean_sd(key)
        colour = KIND_COLOURS.get(g.kind, "C7")
        ax.errorbar(mean, y, xerr=sd, fmt="o", color=colour, capsize=3, zorder=3)
        if math.isfinite(mean):
            text = f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if len(g.runs) > 1 else "")
            ax.annotate(text, (mean, y), xytext=(0, 5), textcoords="offset points", ha="center",
                        fontsize=7)  # fmt: skip
        if g.variant in controls:
            cmean, csd = controls[g.variant].mean_sd(key)
            ax.errorbar(cmean, y + 0.3, xerr=csd, fmt="D", mfc="white", color="0.45",
                        capsize=2, ms=5, zorder=2)  # fmt: skip


def _verdict_legend(fig, seeds: int, controls: bool, reference: bool, residual: bool) -> None:
    """What the markers and lines mean, below the panels (only those drawn)."""
    label = f"trained, mean ± sd ({seeds} seeds)"
    handles = [Line2D([], [], marker="o", ls="", color="0.2", label=label)]
    if controls:
        handles.append(
            Line2D([], [], marker="D", ls="", mfc="white", color="0.45", label="untrained control")
        )
    if reference:
        colour = KIND_COLOURS["crosscoder"]
        handles.append(Line2D([], [], ls=":", color=colour, label="standard crosscoder"))
    if residual:
        handles.append(Line2D([], [], ls="--", color="k", lw=0.8, label="raw residual probe"))
    handles.append(Patch(color="0.9", label="premise: 1-2 layers"))
    fig.legend(handles=handles, loc="outside lower center", ncol=5, fontsize=8, frameon=False)


def verdict(groups: list[Group], n_layers: int, path: Path) -> Path:
    """The paper's effects per variant: trained mean ± sd over seeds (filled) and the
    untrained control (hollow), the standard crosscoder's mean as a dotted reference line,
    the raw-residual probe as a dashed one and the premise (1-2 layers) shaded."""
    trained = _role(groups, "trained")
    controls = {g.variant: g for g in _role(groups, "control")}
    residual = next((g for g in _role(groups, "baseline") if g.variant == "residual"), None)
    reference = next((g for g in trained if g.kind == "crosscoder"), None)
    height = 1.5 + 0.42 * max(len(trained), 1)
    fig, axes = _figure(1, len(EFFECTS), 13.0, height, sharey=True)
    for ax, (key, title, xlabel, digits) in zip(axes[0], EFFECTS, strict=True):
        if key == "fc":
            ax.axvspan(1, 2, color="0.9", zorder=0)
            ax.set_xlim(0.5, max(n_layers, 2) + 0.5)
        if key == "probe_f1" and residual is not None:
            ax.axvline(residual.mean_sd(key)[0], color="k", ls="--", lw=0.8)
        if reference is not None:
            ax.axvline(reference.mean_sd(key)[0], color=KIND_COLOURS["crosscoder"], ls=":")
        _verdict_points(ax, key, digits, trained, controls)
        ax.set(title=title, xlabel=xlabel)
        ax.title.set_fontsize(10)
        ax.margins(x=0.1)
        ax.grid(axis="x", color="0.92")
    axes[0, 0].set_yticks(range(len(trained)), [g.variant for g in trained])
    axes[0, 0].set_ylim(len(trained) - 0.4, -0.6)
    seeds = max((len(g.runs) for g in trained), default=0)
    _verdict_legend(fig, seeds, bool(controls), reference is not None, residual is not None)
    fig.suptitle("Verdict: the paper's effects, fmxcoder against crosscoder", fontsize=11)
    return _save(fig, path)


def _mean_curve(curves: list[dict]) -> tuple[list, np.ndarray, np.ndarray]:
    """Pointwise mean and sd over seeds of ``{x: y}`` curves (x values they all share)."""
    xs = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    ys = np.array([[c[x] for x in xs] for c in curves], dtype=float).reshape(len(curves), -1)
    sd = ys.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(len(xs))
    return xs, ys.mean(axis=0) if curves else ys, sd


def _band(ax, xs, mean, sd, colour: str, label: str | None, **kw) -> None:
    ax.plot(xs, mean, color=colour, marker="o", ms=3, label=label, **kw)
    if len(xs) and np.any(sd > 0):
        ax.fill_between(xs, mean - sd, mean + sd, color=colour, alpha=0.18, lw=0)


def fvu_per_layer(t: Tables, path: Path) -> Path:
    """FVU per layer per trained variant (mean ± sd over seeds); the spliced-in CE score
    per layer beside it when it was computed."""
    splice = any(_finite(r.get("ce_score")) for r in t.per_layer)
    fig, axes = _figure(1, 1 + splice, WIDE, 4.0)
    colours = _colours(t.groups)
    panels = [("fvu", axes[0, 0])] + ([("ce_score", axes[0, 1])] if splice else [])
    for g in _role(t.groups, "trained"):
        runs = t.runs_of(t.per_layer, g).values()
        for key, ax in panels:
            curves = [{layer_number(r["hook"]): r[key] for r in rows} for rows in runs if rows]
            label = g.variant if key == "fvu" else None
            _band(ax, *_mean_curve(curves), colours[g.variant], label)
    for _, ax in panels:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer (block index)")
    axes[0, 0].set(
        ylabel="FVU (fraction of variance unexplained)", title="Reconstruction per layer"
    )
    axes[0, 0].set_ylim(bottom=0)
    if splice:
        axes[0, 1].set(ylabel="CE score (1 = clean loss)", title="Spliced-in loss recovered")
        axes[0, 1].axhline(1.0, color="grey", lw=0.8, ls="--")
    _outside_legend(fig, title="trained, mean ± sd")
    return _save(fig, path)


def probing_f1(t: Tables, path: Path) -> Path:
    """Mean probing F1 against k per trained variant (mean over seeds) and the baselines
    (dashed: the best residual layer, each per-layer SAE's best layer)."""
    fig, axes = _figure(1, 2, WIDE, 4.0)
    colours = _colours(t.groups)
    features = {b["variant"]: b.get("features", {}) for b in t.summary.get("baselines", [])}
    lines = [(g, colours[g.variant], "-") for g in _role(t.groups, "trained")]
    lines += [
        (g, "k" if g.variant == "residual" else f"C{7 + i % 3}", "--")
        for i, g in enumerate(_role(t.groups, "baseline"))
        if " untrained" not in g.variant
    ]
    for ax, task in zip(axes[0], ("token", "sequence"), strict=True):
        for g, colour, ls in lines:
            names = [features[n].get(task) for n in g.names] if g.role == "baseline" else g.names
            curves = [c for n in names if n and (c := f1_by_k(t.probing, n, task))]
            if curves:
                label = g.variant if task == "token" else None
                _band(ax, *_mean_curve(curves), colour, label, ls=ls)
        ax.set(
            xscale="log",
            xlabel="k: latents or residual dims kept (log scale)",
            ylabel="mean test F1 over concepts (0-1)",
            title=f"{task}-level sparse probing",
            ylim=(0, 1.02),
        )
    _outside_legend(fig, title="mean over seeds")
    return _save(fig, path)


def _spread_labels(ys: list[float], gap: float) -> list[float]:
    """Label heights for points at ``ys``: in the points' order, at least ``gap`` apart."""
    out: list[float] = []
    for i in np.argsort(ys):
        out.append((i, max(ys[i], out[-1][1] + gap) if out else ys[i]))
    return [y for _, y in sorted(out)]


LEADER = {"arrowstyle": "-", "color": "0.6", "lw": 0.6}  # a thin line from label to point


def l0_fvu(groups: list[Group], path: Path) -> Path:
    """Held-out L0 against FVU per trained variant (mean ± sd), each point labelled
    directly (labels stacked apart where points crowd, as at one shared top-k)."""
    fig, axes = _figure(1, 1, 5.6, 4.0)
    ax = axes[0, 0]
    points = [(g, *g.mean_sd("l0"), *g.mean_sd("fvu")) for g in _role(groups, "trained")]
    points = [p for p in points if math.isfinite(p[1]) and math.isfinite(p[3])]
    top = max((p[3] for p in points), default=1.0)
    right = max((p[1] for p in points), default=1.0)
    label_ys = _spread_labels([p[3] for p in points], gap=0.06 * top)
    for (g, l0, l0_sd, fvu, fvu_sd), label_y in zip(points, label_ys, strict=True):
        colour = KIND_COLOURS.get(g.kind, "C7")
        ax.errorbar(l0, fvu, xerr=l0_sd, yerr=fvu_sd, fmt="o", color=colour, capsize=2)
        ax.annotate(g.variant, (l0, fvu), xytext=(l0 - 0.55 * right, label_y), fontsize=7,
                    va="center", arrowprops=LEADER)  # fmt: skip
    ax.set(
        xlabel="L0: active latents per token (held-out)",
        ylabel="FVU (mean over layers)",
        title="Sparsity against reconstruction (lower left is better)",
    )
    ax.title.set_fontsize(10)
    ax.set_ylim(0, max(label_ys, default=top) * 1.08 or 1)
    ax.set_xlim(0, right * 1.06)
    return _save(fig, path)


def _alive(t: Tables, g: Group, column: str) -> np.ndarray:
    """A latent column's finite values over the alive latents of every seed of ``g``."""
    rows = [r for rs in t.runs_of(t.latents, g).values() for r in rs if r["alive"]]
    values = np.array([r.get(column) for r in rows], dtype=float)
    return values[np.isfinite(values)]


def neff_histogram(t: Tables, n_layers: int, path: Path) -> Path:
    """N_eff of the alive latents per trained variant, seeds pooled."""
    fig, axes = _figure(1, 1, 5.6, 4.0)
    ax, colours = axes[0, 0], _colours(t.groups)
    top = max(n_layers, 2)
    bins = np.linspace(1, top, 4 * (top - 1) + 1)
    for g in _role(t.groups, "trained"):
        fc = _alive(t, g, "fc")
        if fc.size and fc.max() > 1:  # a per-layer SAE reads one layer by construction
            weights = np.full(fc.size, 1 / fc.size)
            label = f"{g.variant} ({fc.mean():.2f})"
            ax.hist(fc, bins=bins, weights=weights, histtype="step", lw=1.4,
                    color=colours[g.variant], label=label)  # fmt: skip
    ax.set(
        xlabel="N_eff: layers a latent reads from",
        ylabel="share of alive latents",
        title="Functional coherence, alive latents",
    )
    ax.title.set_fontsize(10)
    _outside_legend(fig, title="variant (mean N_eff)")
    return _save(fig, path)


def spread_scatter(t: Tables, n_layers: int, path: Path) -> Path:
    """D_eff against N_eff per alive latent, one panel per trained variant (seeds pooled):
    points above the diagonal write to more layers than they read from."""
    trained = _role(t.groups, "trained")
    cols = min(max(len(trained), 1), 4)
    rows = -(-max(len(trained), 1) // cols)
    fig, axes = _figure(rows, cols, 3.0 * cols, 2.8 * rows + 0.4)
    top = max(n_layers, 2)
    for ax, g in zip(axes.flat, trained, strict=False):
        latents = [r for rs in t.runs_of(t.latents, g).values() for r in rs if r["alive"]]
        fc = np.array([r["fc"] for r in latents], dtype=float)
        d_eff = np.array([r["d_eff"] for r in latents], dtype=float)
        ax.scatter(fc, d_eff, s=4, alpha=0.35, color=KIND_COLOURS.get(g.kind, "C7"), lw=0)
        ax.plot([1, top], [1, top], color="grey", lw=0.8, ls="--")
        ax.set(xlim=(0.9, top + 0.1), ylim=(0.9, top + 0.1), title=g.variant)
        ax.title.set_fontsize(9)
    for ax in list(axes.flat)[len(trained) :]:
        ax.axis("off")
    fig.supxlabel("N_eff: layers read (encoder contributions)", fontsize=9)
    fig.supylabel("D_eff: layers written (decoder norms)", fontsize=9)
    fig.suptitle("Decoder spread against functional spread, alive latents", fontsize=10)
    return _save(fig, path)


TRAJECTORY_PANELS = (
    ("traj_dec_top2", "decoder energy in the top 2 singular directions (fraction)", (0, 1)),
    ("traj_dec_adjacent_cos", "decoder cosine between adjacent carrying layers", (-1, 1)),
)


def trajectories(t: Tables, path: Path) -> Path | None:
    """Step histograms of two trajectory statistics per trained multi-layer variant; None
    when the evaluation recorded none (an older report, or per-layer SAEs only)."""
    fig, axes = _figure(1, 2, WIDE, 3.8)
    colours, drawn = _colours(t.groups), False
    for ax, (column, label, limits) in zip(axes[0], TRAJECTORY_PANELS, strict=True):
        bins = np.linspace(*limits, 41)
        for g in _role(t.groups, "trained"):
            values = _alive(t, g, column)
            if values.size:
                ax.hist(values, bins=bins, weights=np.full(values.size, 1 / values.size),
                        histtype="step", lw=1.4, color=colours[g.variant],
                        label=f"{g.variant} ({np.median(values):.2f})" if column == "traj_dec_top2"
                        else None)  # fmt: skip
                drawn = True
        ax.set(xlabel=label, ylabel="share of alive latents", title=f"Trajectory: {column}")
    if not drawn:
        plt.close(fig)
        return None
    _outside_legend(fig, title="variant (median top-2)")
    return _save(fig, path)


TRAINING_PANELS = (
    ("loss", None, "training loss, log scale"),
    ("fvu", "val_fvu", "FVU (fraction)"),
    ("l0", "val_l0", "L0 (active latents per token)"),
)


def training_curves(t: Tables, path: Path) -> Path | None:
    """Loss, FVU and L0 against step, every seed of every trained variant in the variant's
    colour (solid: training batches; dashed: validation); None without saved logs."""
    if not t.training:
        return None
    fig, axes = _figure(1, 3, 13.0, 3.8)
    colours = _colours(t.groups)
    for g in _role(t.groups, "trained"):
        for i, rows in enumerate(t.runs_of(t.training, g).values()):
            for ax, (key, val_key, _) in zip(axes[0], TRAINING_PANELS, strict=True):
                train = [(r["step"], r[key]) for r in rows if _finite(r.get(key))]
                label = g.variant if (i == 0 and key == "loss") else None
                if train:
                    ax.plot(*zip(*train, strict=True), color=colours[g.variant], lw=1, label=label)
                val = [(r["step"], r[val_key]) for r in rows if val_key and _finite(r.get(val_key))]
                if val:
                    ax.plot(*zip(*val, strict=True), color=colours[g.variant], ls="--", lw=0.8)
    for ax, (key, _, ylabel) in zip(axes[0], TRAINING_PANELS, strict=True):
        ax.set(xlabel="training step (batches)", ylabel=ylabel, title=f"Training: {key}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].set_yscale("log")
    _outside_legend(fig, title="variant (every seed)")
    return _save(fig, path)


def n_layers(t: Tables) -> int:
    """The most layers any run reads (for N_eff axes)."""
    return max((len(str(r.get("layers", "")).split(",")) for r in t.summary["variants"]), default=1)


# Which figures go on the index (the comparison) and which on the details page.
INDEX_PLOTS = ("verdict", "fvu_per_layer", "probing_f1", "l0_fvu", "neff_hist")
DETAIL_PLOTS = ("spread", "trajectories", "training")


def draw_plots(paths: ReportPaths, labels: dict[str, dict] | None = None) -> dict[str, Path]:
    """Every figure from the saved tables of ``paths`` (runs labelled as ``read_summary``
    says); figures without data are left out."""
    t = load_tables(paths, labels)
    layers = n_layers(t)
    drawn = {
        "verdict": verdict(t.groups, layers, paths.plot("verdict")),
        "fvu_per_layer": fvu_per_layer(t, paths.plot("fvu_per_layer")),
        "probing_f1": probing_f1(t, paths.plot("probing_f1")),
        "l0_fvu": l0_fvu(t.groups, paths.plot("l0_fvu")),
        "neff_hist": neff_histogram(t, layers, paths.plot("neff_hist")),
        "spread": spread_scatter(t, layers, paths.plot("spread")),
        "trajectories": trajectories(t, paths.plot("trajectories")),
        "training": training_curves(t, paths.plot("training")),
    }
    return {name: p for name, p in drawn.items() if p is not None}


def read_metrics_log(run_dir: Path) -> list[dict]:
    """The training log of a run (``metrics.jsonl``): one dict per logged step; [] if none."""
    path = RunPaths(Path(run_dir)).metrics
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_rows(name: str, log: list[dict]) -> list[dict]:
    """A run's logged steps, only the plotted keys (timings differ from run to run)."""
    return [{"variant": name, **{k: r.get(k) for k in TRAINING_KEYS}} for r in log]


def write_plots(paths: ReportPaths, results: list[VariantResult], *measured) -> dict[str, Path]:
    """Save the runs' training logs beside the report tables (``training.parquet``), then
    draw every figure from the saved tables (``draw_plots``), which must be written first.
    ``measured`` (hooks, probe rows, baselines, splices, summaries: what the evaluate stage
    passes) is all in those tables and is not read again."""
    rows = []
    for res in results:
        rows += training_rows(res.variant.name, read_metrics_log(res.variant.run_dir))
    if rows:
        write_table(paths.table("training"), rows)
    return draw_plots(paths)
