"""Result tables of an evaluation: one summary row per variant, long tables, and I/O.

Everything is written twice over: each variant's own files in its run directory (what
``pipeline compare`` reads), and combined long tables with a ``variant`` column in the
report directory. JSON holds summaries; Parquet holds the per-layer, per-latent and
probing tables.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.evaluation.judge import GOOD_RATING
from pipeline.evaluation.latent_details import PURE, LatentDetail
from pipeline.evaluation.run_metrics import VariantResult
from pipeline.evaluation.splice import SpliceResult
from pipeline.evaluation.trajectories import latent_columns, median_columns
from pipeline.paths import EvaluationPaths, ReportPaths
from pipeline.store.format import atomic_write_json, atomic_write_parquet

SUMMARY_KS = (1, 5, 20)


def _finite_mean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


def clean(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN/inf to None."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return clean(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def probe_columns(by_k: dict[str, dict[int, float]]) -> dict[str, float]:
    """``{token: {k: f1}}`` -> ``token_f1_k1``, ... for the summary table."""
    out = {}
    for task in ("token", "sequence"):
        values = by_k.get(task, {})
        for k in SUMMARY_KS:
            capped = [v for kk, v in values.items() if kk <= k]
            out[f"{task}_f1_k{k}"] = values.get(k, capped[-1] if capped else float("nan"))
    return out


def run_id(run_dir: Path) -> str:
    """``<cache key>/<coder hash>``: a run's name relative to the runs root, the same on
    every machine (an absolute path would make committed results differ per machine)."""
    run_dir = Path(run_dir)
    return f"{run_dir.parent.name}/{run_dir.name}"


def summary_row(
    res: VariantResult,
    hooks: list[str],
    purity: np.ndarray,
    details: list[LatentDetail],
    judge: str,
    probe_by_k: dict[str, dict[int, float]],
    splice: SpliceResult | None,
) -> dict[str, Any]:
    v, s = res.variant, res.sparsity
    alive = s.alive
    rated = [d.rating for d in details if d.rating is not None]
    if judge.startswith("purity"):  # the proxy, asked for or as the judge's fallback
        scored = [d.purity for d in details if np.isfinite(d.purity)]
        good, n_rated, mean = sum(p >= PURE for p in scored), len(scored), _finite_mean(scored)
    else:
        good, n_rated = sum(r >= GOOD_RATING for r in rated), len(rated)
        mean = float(np.mean(rated)) if rated else float("nan")
    return {
        "variant": v.name,
        "kind": v.kind,
        "run_dir": run_id(v.run_dir),
        "step": v.step,
        "n_latents": v.coder.n_latents,
        "parameters": int(v.coder.num_parameters()),
        "layers": ",".join(hooks),
        "n_tokens": res.recon.n_tokens,
        "mse": res.recon.mse_mean,
        "fvu": res.recon.fvu_mean,
        "floor_fvu": res.floor_fvu,
        "l0": s.l0,
        "dead_fraction": s.dead_fraction,
        "dense_fraction": s.dense_fraction,
        "n_alive": int(alive.sum()),
        "fc": res.coherence.fc_mean,
        "fc_abs": res.coherence.fc_abs_mean,
        "fc_ablation": res.masking.fc_ablation_mean if res.masking else float("nan"),
        "d_eff": _finite_mean(res.d_eff[alive]),
        "masking_fragile": res.masking.share_fragile if res.masking else float("nan"),
        **probe_columns(probe_by_k),
        "purity": _finite_mean(purity[alive]),
        "purity_pure_share": _finite_mean((purity[alive] >= PURE).astype(float)),
        "judge": judge,
        "judge_rated": n_rated,
        "judge_good": good,
        "judge_mean": mean,
        "ce_score": _finite_mean(splice.score) if splice else float("nan"),
        "kl": _finite_mean(splice.kl) if splice else float("nan"),
        "ce_clean": splice.ce_clean if splice else float("nan"),
        **median_columns(res.trajectories, alive),
    }


def per_layer_rows(res: VariantResult, hooks: list[str], splice: SpliceResult | None) -> list:
    l0 = res.sparsity.l0_per_layer
    return [
        {
            "variant": res.variant.name,
            "layer": j,
            "hook": hook,
            "mse": float(res.recon.mse[j]),
            "fvu": float(res.recon.fvu[j]),
            "l0": float(l0[j]) if l0 is not None else float("nan"),
            "ce_score": float(splice.score[j]) if splice else float("nan"),
            "ce_zero": float(splice.ce_zero[j]) if splice else float("nan"),
            "ce_coder": float(splice.ce_coder[j]) if splice else float("nan"),
            "kl": float(splice.kl[j]) if splice else float("nan"),
        }
        for j, hook in enumerate(hooks)
    ]


def latent_rows(res: VariantResult, purity: np.ndarray, purity_class: np.ndarray) -> list:
    s, m = res.sparsity, res.masking
    own = res.variant.coder.latent_layer()
    own = own.cpu().numpy() if own is not None else np.full(s.fire_count.size, -1)
    traj = latent_columns(res.trajectories, s.fire_count.size)
    return [
        {
            "variant": res.variant.name,
            "latent": i,
            "frequency": float(s.frequency[i]),
            "alive": bool(s.alive[i]),
            "fc": float(res.coherence.fc[i]),
            "fc_abs": float(res.coherence.fc_abs[i]),
            "fc_ablation": float(m.fc_ablation[i]) if m else float("nan"),
            "d_eff": float(res.d_eff[i]),
            "masking_min_ratio": float(m.min_ratio[i]) if m else float("nan"),
            "fragile": bool(m.fragile[i]) if m else False,
            "purity": float(purity[i]),
            "purity_class": str(purity_class[i]) if s.alive[i] else "",
            "own_layer": int(own[i]),
            **{name: float(values[i]) for name, values in traj.items()},
        }
        for i in range(s.fire_count.size)
    ]


def sampled_rows(details: list[LatentDetail]) -> list:
    return [
        {
            "variant": d.variant,
            "latent": d.latent,
            "rating": d.rating,
            "explanation": d.explanation,
            "purity": d.purity,
            "purity_class": d.purity_class,
            "fc": d.fc,
            "d_eff": d.d_eff,
            "contexts": [c.marked() for c in d.contexts],
        }
        for d in details
    ]


def write_table(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_parquet(path, pa.Table.from_pylist(rows))


def write_variant(paths: EvaluationPaths, summary: dict, tables: dict[str, list]) -> None:
    paths.root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(paths.metrics, clean(summary))
    for name in ("per_layer", "latents", "probing"):
        write_table(getattr(paths, name), tables[name])


def write_report_tables(paths: ReportPaths, summary: dict, tables: dict[str, list]) -> None:
    paths.root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(paths.summary, clean(summary))
    for name, rows in tables.items():
        write_table(paths.table(name), rows)


def read_summaries(target: Path) -> list[dict]:
    """Summary rows from a report directory, a run directory or a run's final checkpoint."""
    target = Path(target)
    if (target / "results.json").is_file():
        summary = json.loads((target / "results.json").read_text())
        return summary["variants"] + summary.get("baselines", [])
    for root in (target, target.parent):
        metrics = EvaluationPaths(root / "evaluation").metrics
        if metrics.is_file():
            return [json.loads(metrics.read_text())]
    raise FileNotFoundError(
        f"{target}: no evaluation results (run `pipeline evaluate {target}` first)"
    )


COMPARE_COLUMNS = (
    ("variant", "variant", "{}"),
    ("kind", "kind", "{}"),
    ("fvu", "FVU", "{:.3f}"),
    ("mse", "MSE", "{:.3g}"),
    ("l0", "L0", "{:.1f}"),
    ("dead_fraction", "dead", "{:.0%}"),
    ("dense_fraction", "dense", "{:.0%}"),
    ("fc", "FC", "{:.2f}"),
    ("d_eff", "D_eff", "{:.2f}"),
    ("masking_fragile", "fragile", "{:.0%}"),
    ("token_f1_k1", "tokF1@1", "{:.2f}"),
    ("token_f1_k5", "tokF1@5", "{:.2f}"),
    ("sequence_f1_k1", "seqF1@1", "{:.2f}"),
    ("sequence_f1_k5", "seqF1@5", "{:.2f}"),
    ("judge_good", "coherent", "{}"),  # rated >= 4, or purity >= 0.5 for the proxy
    ("ce_score", "CE score", "{:.3f}"),
)


def format_table(rows: list[dict]) -> str:
    """A fixed-width side-by-side table; missing values show as '-'."""

    def cell(row: dict, key: str, fmt: str) -> str:
        value = row.get(key)
        if key == "judge_good" and value is not None:
            return f"{value}/{row.get('judge_rated', 0)}"
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "-"
        return fmt.format(value)

    header = [title for _, title, _ in COMPARE_COLUMNS]
    body = [[cell(r, key, fmt) for key, _, fmt in COMPARE_COLUMNS] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]
    lines = [
        "  ".join(
            x.ljust(w) if i < 2 else x.rjust(w)
            for i, (x, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in [header, *body]
    ]
    return "\n".join(lines)
