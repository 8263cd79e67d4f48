"""Tables across experiments: several results directories (each written by `pipeline run`)
lined up along the one thing the experiments vary.

- ``family_recovery``: the planted benchmark run on each drift family (one experiment per
  family; the family is the harvest manifest's ``model.planted.drift``): the share of true
  features each variant recovers, per feature kind, side by side.
- ``scale_trend``: experiments that differ in training tokens: each fmxcoder against the
  crosscoder of the same width and against the crosscoder of the same parameter count,
  paired by seed (MSE ratio and probe-F1 difference), so the trend has a spread.

Both read only the files `pipeline run` wrote (``experiment.yaml``, ``harvest.yaml``,
``report/results.json``), never the runs, so a collated table can be rebuilt anywhere.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from pipeline.experiment.results_table import (
    RECOVERY_KINDS,
    aggregate,
    paper_table,
    recovery_table,
)
from pipeline.manifests.io import read_mapping
from pipeline.paths import ExperimentPaths

RECOVERY_COLUMNS = ("mmcs", "recovered", *(f"recovered_{k}" for k in RECOVERY_KINDS))
# A crosscoder counts as parameter-matched to an fmxcoder within this relative difference
# (the matched variants round their latent count, e.g. 209 latents for 2.41M parameters).
PARAMETER_MATCH = 0.05


@dataclass(frozen=True)
class Experiment:
    """One results directory: its manifests and its evaluation summary."""

    path: Path
    experiment: dict
    harvest: dict
    summary: dict

    @property
    def name(self) -> str:
        return str(self.experiment.get("name", self.path.name))

    @property
    def training_tokens(self) -> int:
        return int(self.experiment["defaults"]["training"]["tokens"])

    @property
    def drift(self) -> str:
        planted = (self.harvest.get("model") or {}).get("planted") or {}
        return str(planted.get("drift", "planar"))


def load_experiment(path: Path) -> Experiment:
    """Read a results directory; a missing file is named in the error."""
    for name in ("experiment.yaml", "harvest.yaml", "protocol.json", "report/results.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{path / name}: missing (written by pipeline run; rerun it to add it)"
            )
    paths = ExperimentPaths(path)
    summary = json.loads((paths.report / "results.json").read_text())
    labels = json.loads(paths.protocol_labels.read_text())
    for row in summary["variants"]:
        row["protocol"] = labels.get(row["run_dir"])
    return Experiment(
        path=path,
        experiment=read_mapping(paths.experiment_manifest),
        harvest=read_mapping(paths.harvest_manifest),
        summary=summary,
    )


def _mean_sd(values: list[float]) -> tuple[float, float, int]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan, 0
    sd = statistics.stdev(finite) if len(finite) > 1 else math.nan
    return statistics.fmean(finite), sd, len(finite)


def _pm(mean: float, sd: float, digits: int = 2, scale: float = 1.0) -> str:
    if not math.isfinite(mean):
        return ""
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {sd * scale:.{digits}f}" if math.isfinite(sd) else "")


# --- planted drift families ---------------------------------------------------------------


def family_recovery(experiments: list[Experiment]) -> list[dict]:
    """One row per (variant, role, drift family): recovered share per kind, mean and sd over
    seeds, and the variant's FVU on that family (same seeds)."""
    rows = []
    for exp in experiments:
        runs = paper_table(exp.summary)
        fvu = {(r["variant"], r["role"]): r for r in aggregate(runs)}
        order = list(dict.fromkeys(r["variant"] for r in runs))
        recovery = sorted(recovery_table(exp.summary), key=lambda r: order.index(r["variant"]))
        for row in recovery:
            out = {"family": exp.drift, "experiment": exp.name}
            out |= {"variant": row["variant"], "role": row["role"], "seeds": row["seeds"]}
            f = fvu.get((row["variant"], row["role"]), {})
            for key, source in (*((k, row) for k in RECOVERY_COLUMNS), ("fvu", f)):
                sd = source.get(f"{key}_sd", math.nan) if row["seeds"] > 1 else math.nan
                out[key], out[f"{key}_sd"] = source.get(key, math.nan), sd  # one seed: no spread
            rows.append(out)
    return rows


def render_families(rows: list[dict]) -> str:
    """Markdown: spanning-feature recovery per family first (the question), then each kind."""
    families = list(dict.fromkeys(r["family"] for r in rows))
    trained = [r for r in rows if r["role"] == "trained"]
    variants = list(dict.fromkeys(r["variant"] for r in trained))
    cell = {(r["variant"], r["family"]): r for r in trained}
    lines = [
        "Planted-feature recovery per drift family (trained runs; share of true features "
        "whose best decoder cosine exceeds 0.9; mean ± sd over seeds, sd blank for one "
        "seed). Controls (untrained) recover " + _control_ceiling(rows) + ".",
        "",
    ]
    for key, title in (
        ("recovered_spanning", "spanning (multi-layer) features"),
        ("recovered_single", "single-layer features"),
        ("recovered_cooccurring", "co-occurring pairs (on different layers)"),
        ("fvu", "test FVU"),
    ):
        lines += [f"**{title}**", ""]
        lines.append("| variant | " + " | ".join(families) + " |")
        lines.append("|---|" + "---|" * len(families))
        for v in variants:
            cells = []
            for fam in families:
                r = cell.get((v, fam))
                digits = 3 if key == "fvu" else 2
                cells.append(
                    _pm(r[key], r[f"{key}_sd"], digits) if r and r[key] is not None else ""
                )
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("")
    seeds = sorted({(r["family"], r["experiment"], r["seeds"]) for r in trained})
    lines.append(
        "Experiments: " + "; ".join(f"{fam}: `{exp}` ({n} seed(s))" for fam, exp, n in seeds) + "."
    )
    return "\n".join(lines) + "\n"


def _control_ceiling(rows: list[dict]) -> str:
    controls = [
        r["recovered"] for r in rows if r["role"] == "control" and r["recovered"] is not None
    ]
    return f"at most {max(controls):.2f} of all features" if controls else "(no controls)"


# --- scale trend --------------------------------------------------------------------------


def _pairs(runs: list[dict]) -> list[tuple[str, dict, dict]]:
    """(comparison, fmxcoder run, crosscoder run) for every trained fmxcoder run: the
    crosscoder of the same width and seed, and the one of the same parameter count."""
    trained = [r for r in runs if r["role"] == "trained"]
    crosscoders = [r for r in trained if r["kind"] == "crosscoder"]
    out = []
    for fmx in (r for r in trained if r["kind"] == "fmxcoder"):
        same_seed = [c for c in crosscoders if c["seed"] == fmx["seed"]]
        for c in same_seed:
            if c["latents"] == fmx["latents"]:
                out.append(("same latents", fmx, c))
            elif abs(c["parameters"] - fmx["parameters"]) <= PARAMETER_MATCH * fmx["parameters"]:
                out.append(("same parameters", fmx, c))
    return out


def scale_trend(experiments: list[Experiment]) -> list[dict]:
    """One row per (tokens, fmxcoder variant, comparison): MSE ratio fmx / crosscoder and
    probe-F1 difference in points, each a mean and sd over the seeds both ran."""
    rows = []
    for exp in sorted(experiments, key=lambda e: e.training_tokens):
        grouped: dict[tuple, list[tuple[dict, dict]]] = {}
        for comparison, fmx, cc in _pairs(paper_table(exp.summary)):
            grouped.setdefault((fmx["variant"], comparison, cc["variant"]), []).append((fmx, cc))
        for (variant, comparison, baseline), pairs in grouped.items():
            ratio = _mean_sd([f["mse"] / c["mse"] for f, c in pairs])
            f1 = _mean_sd([100 * (f["probe_f1"] - c["probe_f1"]) for f, c in pairs])
            rows.append(
                {
                    "experiment": exp.name,
                    "tokens": exp.training_tokens,
                    "variant": variant,
                    "latents": pairs[0][0]["latents"],
                    "comparison": comparison,
                    "baseline": baseline,
                    "baseline_latents": pairs[0][1]["latents"],
                    "seeds": ratio[2],
                    "mse_ratio": ratio[0],
                    "mse_ratio_sd": ratio[1],
                    "probe_f1_points": f1[0],
                    "probe_f1_points_sd": f1[1],
                    "fmx_lr": pairs[0][0]["lr"],
                    "baseline_lr": pairs[0][1]["lr"],
                }
            )
    return rows


def render_trend(rows: list[dict]) -> str:
    lines = [
        "fmxcoder vs crosscoder against fresh training tokens (single epoch). MSE ratio = "
        "fmxcoder test MSE / crosscoder test MSE (below 1: the fmxcoder reconstructs "
        "better); probe F1 difference in points (above 0: the fmxcoder's latents probe "
        "better). Paired by seed; mean ± sd over seeds (sd blank for one seed). Each "
        "variant at its own learning rate from the budget's sweep.",
        "",
        "| tokens | fmxcoder | vs | baseline | seeds | MSE ratio | probe F1 diff (pts) "
        "| lr fmx / base |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens']:,} | {r['variant']} ({r['latents']:,}) | {r['comparison']} | "
            f"{r['baseline']} ({r['baseline_latents']:,}) | {r['seeds']} | "
            f"{_pm(r['mse_ratio'], r['mse_ratio_sd'], 3)} | "
            f"{_pm(r['probe_f1_points'], r['probe_f1_points_sd'], 1)} | "
            f"{r['fmx_lr']:g} / {r['baseline_lr']:g} |"
        )
    return "\n".join(lines) + "\n"


def plot_trend(rows: list[dict], path: Path) -> Path:
    """Two panels against tokens (log axis): MSE ratio and probe-F1 difference, one line per
    (fmxcoder, comparison), error bars one sd over seeds; legend below the axes."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    lines = {}
    for r in rows:
        lines.setdefault(f"{r['variant']} vs {r['comparison']}", []).append(r)
    for label, points in lines.items():
        points.sort(key=lambda p: p["tokens"])
        x = [p["tokens"] for p in points]
        for ax, key in zip(axes, ("mse_ratio", "probe_f1_points"), strict=True):
            sd = [p[f"{key}_sd"] if math.isfinite(p[f"{key}_sd"]) else 0.0 for p in points]
            ax.errorbar(x, [p[key] for p in points], yerr=sd, marker="o", capsize=3, label=label)
    axes[0].axhline(1.0, color="grey", lw=0.8, ls="--")
    axes[1].axhline(0.0, color="grey", lw=0.8, ls="--")
    axes[0].set_ylabel("test MSE, fmxcoder / crosscoder")
    axes[1].set_ylabel("probe F1, fmxcoder - crosscoder (points)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("fresh training tokens")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(rows: list[dict], markdown: str, out: Path, stem: str) -> list[Path]:
    """``<stem>.json`` and ``<stem>.md`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    clean = [
        {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
        for r in rows
    ]
    (out / f"{stem}.json").write_text(json.dumps(clean, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    return [out / f"{stem}.json", out / f"{stem}.md"]
