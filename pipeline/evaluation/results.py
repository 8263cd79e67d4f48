"""Result tables of an evaluation: one summary row per variant, long tables, and I/O.

Everything is written twice over: each variant's own files in its run directory (what
``pipeline compare`` reads), and combined long tables with a ``variant`` column in the
report directory. JSON holds summaries; Parquet holds the per-layer, per-latent and
probing tables.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from importlib.metadata import version
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


def coherent_flags(details: list[LatentDetail], judge: str) -> list[bool]:
    """Per rated latent: coherent (rating >= 4, or purity >= PURE for the proxy)?"""
    if judge.startswith("purity"):  # the proxy, asked for or as the judge's fallback
        return [bool(d.purity >= PURE) for d in details if np.isfinite(d.purity)]
    return [d.rating >= GOOD_RATING for d in details if d.rating is not None]


# The code an evaluation's figures depend on (relative to pipeline/): any change to these
# files changes the evaluation-code version, and a recorded evaluation is no longer reused.
CODE_FILES = (
    "evaluation/*.py",
    "coders/*.py",
    "training/loader.py",
    "training/readers/*.py",
    "store/reader.py",
    "store/outliers.py",
)
LIBRARIES = ("torch", "numpy", "scipy", "scikit-learn")
# Options that change no figure (where things are, how progress shows): not recorded.
UNRECORDED_OPTIONS = ("cache_root", "progress")
# Recorded, but no reason to re-evaluate: the device and the wording of the splice note.
UNCOMPARED_OPTIONS = ("device", "splice_off_by")


def code_version(extra: tuple[Path, ...] = ()) -> dict[str, str]:
    """A SHA-256 over the evaluation code (``CODE_FILES`` and ``extra``, by relative name
    and bytes, in sorted order) and the versions of the numerical libraries."""
    package = Path(__file__).resolve().parents[1]
    files = sorted({f for pattern in CODE_FILES for f in package.glob(pattern)})
    digest = hashlib.sha256()
    for f in [*files, *extra]:
        name = f.relative_to(package) if f.is_relative_to(package) else Path(f.name)
        digest.update(f"{name.as_posix()}\0".encode() + f.read_bytes() + b"\0")
    return {"sha256": digest.hexdigest()[:16]} | {lib: version(lib) for lib in LIBRARIES}


def weights_checksums(checkpoint: Path) -> dict[str, str]:
    """``file: sha256`` of a checkpoint, from its ``checksums.json`` (written last)."""
    path = Path(checkpoint) / "checksums.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing: the checkpoint is not finished")
    files = json.loads(path.read_text())["files"]
    return {name: files[name]["sha256"] for name in sorted(files)}


def recorded_options(options: dict) -> dict:
    """The evaluation options as results.json records them (paths left out)."""
    out = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
    return clean({k: out[k] for k in sorted(out) if k not in UNRECORDED_OPTIONS})


def provenance(store: str, weights: dict[str, dict], options: dict, code: dict) -> dict:
    """What an evaluation's figures are a function of: the store key, each run's weight
    checksums (by run id), the options and the code. Reuse needs all four to match."""
    return clean(
        {
            "store": store,
            "weights": {run: weights[run] for run in sorted(weights)},
            "options": recorded_options(options),
            "code": code,
        }
    )


def _differences(recorded: dict, expected: dict) -> list[str]:
    if recorded.get("store") != expected["store"]:
        return [f"store {recorded.get('store')} -> {expected['store']}"]
    out = []
    old, new = recorded.get("weights", {}), expected["weights"]
    if set(old) != set(new):
        out.append("other runs")
    elif changed := [run for run in new if old[run] != new[run]]:
        out.append(
            f"weights of {changed[0]} changed" + (f" (+{len(changed) - 1})" * (len(changed) > 1))
        )
    options = [
        k
        for k in sorted(set(expected["options"]) | set(recorded.get("options", {})))
        if k not in UNCOMPARED_OPTIONS
        and recorded.get("options", {}).get(k) != expected["options"].get(k)
    ]
    if options:
        out.append(f"options differ ({', '.join(options)})")
    if recorded.get("code") != expected["code"]:
        out.append("evaluation code or library versions differ")
    return out


def missing_outputs(paths: ReportPaths) -> list[str]:
    """Report files that are absent: the summary tables, the index, and every page and plot
    the index links to (per-latent pages are not committed, so a checkout lacks them)."""
    names = ["results.json", "index.html"]
    names += [f"{t}.parquet" for t in ("variants", "per_layer", "latents", "sampled", "probing")]
    if paths.index.is_file():
        names += re.findall(r'(?:href|src)="((?:latents|plots)/[^"#?]+)"', paths.index.read_text())
    return [name for name in dict.fromkeys(names) if not (paths.root / name).is_file()]


def stale_reason(paths: ReportPaths, expected: dict) -> str | None:
    """Why the evaluation in ``paths`` cannot be reused for ``expected`` (``provenance``),
    or None when it can: every recorded input matches and every output is there."""
    if not paths.summary.is_file():
        return "no earlier evaluation"
    recorded = json.loads(paths.summary.read_text()).get("provenance")
    if recorded is None:
        return "the earlier results.json records no provenance (older format)"
    reasons = _differences(recorded, expected)
    missing = missing_outputs(paths)
    if missing:
        reasons.append(f"{len(missing)} report file(s) missing, e.g. {missing[0]}")
    return "; ".join(reasons) or None


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
    flags = coherent_flags(details, judge)
    good, n_rated = sum(flags), len(flags)
    if judge.startswith("purity"):
        mean = _finite_mean([d.purity for d in details if np.isfinite(d.purity)])
    else:
        rated = [d.rating for d in details if d.rating is not None]
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
