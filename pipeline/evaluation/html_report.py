"""A static HTML report: an index that answers first (the verdict figure, then one row per
variant with mean ± sd over seeds, controls and baselines apart, the comparison plots and,
folded per variant, the chosen latents), a details page (every run on its own row, the
diagnostic plots) and one page per chosen latent (contexts by activation band, activation
histogram, per-layer decoder norms and encoder contributions, logit effects). Plain files
with relative links, no scripts, no external assets. Pages are Jinja2 templates
(``templates/``) with autoescaping on, so every piece of text from the data (token text,
titles, explanations) is escaped. The index and details pages read only the saved report
tables, so ``rerender`` rebuilds them without the runs.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import jinja2
import numpy as np

from pipeline.evaluation.latent_choice import RANDOM
from pipeline.evaluation.latent_details import Context, LatentDetail
from pipeline.evaluation.report import (
    DETAIL_PLOTS,
    INDEX_PLOTS,
    PROBE_K,
    Group,
    draw_plots,
    group_runs,
    layer_number,
    read_rows,
    read_summary,
)
from pipeline.evaluation.results import COMPARE_COLUMNS
from pipeline.evaluation.run_metrics import HIST_EDGES
from pipeline.paths import ReportPaths

INDEX_TITLE = "fmxcoders evaluation"
DETAILS = "details.html"  # beside index.html
# Summary keys that are bookkeeping, not metrics: never shown as extra columns.
HIDDEN_KEYS = {"run_dir", "report", "layers", "judge", "judge_rated", "features", "step"}
PLOT_TITLES = {
    "verdict": "Verdict",
    "fvu_per_layer": "Reconstruction per layer",
    "probing_f1": "Sparse probing F1 against k",
    "l0_fvu": "L0 against FVU",
    "neff_hist": "Functional coherence (N_eff)",
    "spread": "Decoder spread against functional spread",
    "trajectories": "Trajectory statistics",
    "training": "Training curves",
}


def slug(name: str) -> str:
    """A run name as a directory name (the evaluate stage's rule for latent pages)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


@cache
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("pipeline.evaluation", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _fmt(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return fmt.format(value)


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    fmt: str
    text: bool = False


def columns_present(rows: list[dict]) -> list[Column]:
    """The known columns with a value in some row, in their usual order, then any other
    numeric metric the rows carry (so new summary fields show without code changes here)."""
    known = {key for key, _, _ in COMPARE_COLUMNS}
    out = [
        Column(key, title, fmt, key in ("variant", "kind"))
        for key, title, fmt in COMPARE_COLUMNS
        if key in ("variant", "kind") or any(r.get(key) is not None for r in rows)
    ]
    extra = sorted(
        {
            key
            for r in rows
            for key, value in r.items()
            if key not in known | HIDDEN_KEYS
            and isinstance(value, int | float)
            and not isinstance(value, bool)
        }
    )
    return out + [Column(key, key, "{:.3g}") for key in extra]


def _cell(row: dict, col: Column) -> str:
    value = row.get(col.key)
    if col.key == "judge_good" and value is not None:
        return f"{value}/{row.get('judge_rated', 0)}"
    return _fmt(value, col.fmt)


def bar_chart(values, labels, title: str, xlabel: str, ylabel: str) -> dict:
    """Geometry of a small bar chart for the ``bar_chart`` template macro."""
    width, height, left, top, bottom_pad = 440, 210, 46, 24, 38
    values = np.nan_to_num(np.asarray(values, dtype=float))
    n = max(len(values), 1)
    peak = float(values.max()) if values.size and values.max() > 0 else 1.0
    right, bottom = width - 8, height - bottom_pad
    bar_w = (right - left) / n
    step = max(1, n // 12)
    bars = []
    for i, (v, label) in enumerate(zip(values, labels, strict=True)):
        h = (bottom - top) * v / peak
        x = left + i * bar_w
        bars.append(
            {
                "x": f"{x + 0.5:.1f}",
                "y": f"{bottom - h:.1f}",
                "w": f"{max(bar_w - 1, 1):.1f}",
                "h": f"{h:.1f}",
                "cx": f"{x + bar_w / 2:.1f}",
                "label": str(label),
                "value": f"{v:.4g}",
                "tick": i % step == 0,
            }
        )
    return {
        "width": width,
        "height": height,
        "left": left,
        "right": right,
        "top": top,
        "bottom": bottom,
        "y_max": f"{peak:.3g}",
        "bars": bars,
        "title": title,
        "xlabel": xlabel,
        "ylabel": ylabel,
    }


def _context(c: Context) -> dict:
    peak = max(float(c.acts.max()) if c.acts.size else 0.0, c.top_value, 1e-9)
    tokens = []
    for row, text, act in zip(c.rows.tolist(), c.texts, c.acts.tolist(), strict=True):
        top = row == c.top_row
        tokens.append(
            {
                "text": text,
                "marked": act > 0 or top,
                "top": top,
                "alpha": f"{0.15 + 0.85 * max(act, 0) / peak:.2f}",
                "act": f"{act:.3g}",
            }
        )
    return {"tokens": tokens, "value": f"{c.top_value:.3g}", "doc": c.doc_label}


def _bands(contexts: list[Context]) -> list[dict]:
    bands: dict[str, list[dict]] = {}
    for c in contexts:
        bands.setdefault(c.band, []).append(_context(c))
    return [{"label": label, "contexts": items} for label, items in bands.items()]


def _shown(token: str) -> str:
    """A vocabulary entry, quoted so spaces show; byte pieces (``<bytes ..>``) as they are."""
    return token if token.startswith("<bytes ") else repr(token)


def latent_page(d: LatentDetail, hooks: list[str], logits_skipped: str) -> str:
    layers = [layer_number(h) for h in hooks]
    stats = [
        ("chosen as", d.chosen_by),
        ("frequency", f"{d.frequency:.4%} of held-out tokens"),
        ("N_eff (reads from)", _fmt(d.fc, "{:.2f}")),
        ("D_eff (writes to)", _fmt(d.d_eff, "{:.2f}")),
        ("purity", f"{_fmt(d.purity, '{:.2f}')} ({d.purity_class})"),
        ("judge rating", "-" if d.rating is None else str(d.rating)),
        ("explanation", d.explanation),
    ]
    lo = HIST_EDGES[:-1]
    nonzero = np.flatnonzero(d.histogram)
    span = slice(nonzero.min(), nonzero.max() + 1) if nonzero.size else slice(0, len(lo))
    charts = [
        bar_chart(
            d.histogram[span],
            [f"{v:.1f}" for v in lo[span]],
            "Activation histogram (held-out tokens)",
            "log10 activation (bin start)",
            "tokens (count)",
        ),
        bar_chart(
            d.decoder_norms,
            layers,
            "Decoder norm per layer",
            "layer (block index)",
            "||W_dec|| (raw units)",
        ),
        bar_chart(
            d.contributions,
            layers,
            "Encoder contribution per layer (top contexts)",
            "layer (block index)",
            "share of positive input (0-1)",
        ),
    ]
    logits = [
        (_shown(a), f"{va:.3g}", _shown(b), f"{vb:.3g}")
        for (a, va), (b, vb) in zip(d.logits_top, d.logits_bottom, strict=True)
    ]
    return (
        environment()
        .get_template("latent.html")
        .render(
            title=f"{d.variant} latent {d.latent}",
            d=d,
            chosen_by=d.chosen_by,
            stats=stats,
            charts=charts,
            bands=_bands(d.contexts),
            logits=logits,
            logits_skipped=logits_skipped,
        )
    )


def _recovery(meta: dict) -> dict | None:
    """Planted caches only: recovery by kind and the span calibration of each metric."""
    recovery = meta.get("recovery")
    if not recovery:
        return None
    kinds = ("single", "spanning", "cooccurring")
    metrics = sorted({m for r in recovery.values() for m in r["calibration"]})
    rows = []
    for name, r in recovery.items():
        s, cal = r["summary"], r["calibration"]
        cells = [_fmt(s["mmcs"], "{:.3f}"), _fmt(s["recovered"], "{:.0%}")]
        cells += [_fmt(s["by_kind"][k]["recovered"], "{:.0%}") for k in kinds]
        cells += [_fmt(cal.get(m, {}).get("spearman"), "{:.2f}") for m in metrics]
        rows.append({"name": name, "cells": cells})
    return {"kinds": kinds, "metrics": metrics, "rows": rows}


def _latent_row(d: LatentDetail, slug: str) -> dict:
    return {
        "href": f"latents/{slug}/{d.latent}.html",
        "latent": d.latent,
        "purity": _fmt(d.purity, "{:.2f}"),
        "rating": "-" if d.rating is None else str(d.rating),
        "fc": _fmt(d.fc, "{:.2f}"),
        "d_eff": _fmt(d.d_eff, "{:.2f}"),
        "first": (d.contexts[0].marked() if d.contexts else "")[:120],
    }


def _latent_lists(
    details: dict[str, list[LatentDetail]], slugs: dict[str, str], groups: list[Group]
) -> list[dict]:
    """Per variant (its seeds, then its controls): each run's chosen latents by reason."""
    variant_of = {name: g.variant for g in groups for name in g.names}
    out: dict[str, dict] = {}
    for name, items in details.items():
        entry = out.setdefault(variant_of.get(name, name), {"runs": [], "count": 0})
        groups_of_run: dict[str, list[dict]] = {}
        for d in items:
            groups_of_run.setdefault(d.chosen_by, []).append(_latent_row(d, slugs[name]))
        entry["runs"].append(
            {"name": name, "groups": [{"label": k, "rows": v} for k, v in groups_of_run.items()]}
        )
        entry["count"] += len(items)
    return [{"name": variant, **entry} for variant, entry in out.items()]


def logits_skipped_reason(meta: dict) -> str:
    """Why logit effects are missing: the model was not loaded, and what turned it off."""
    splice = str(meta.get("splice", ""))
    why = splice.removeprefix("skipped").strip(" ()") or "splicing was off"
    return f"the model was not loaded ({why}), so its unembedding is not available."


# The seed-aggregated tables: key, title, format spec (of mean and sd alike). Diagnostics
# (dead and dense shares, masking fragility, probe F1 per task and k) are on the details page.
AGGREGATE_COLUMNS = (
    ("parameters", "parameters", "M"),  # millions
    ("l0", "L0", ".1f"),
    ("fvu", "FVU", ".3f"),
    ("mse", "MSE", ".3g"),
    ("probe_f1", f"probe F1@{PROBE_K}", ".3f"),
    ("fc", "N_eff", ".2f"),
    ("d_eff", "D_eff", ".2f"),
    ("coherent", "coherent", ".2f"),
    ("ce_score", "CE score", ".3f"),
)


def _mean_sd_cell(group: Group, key: str, spec: str) -> str:
    """``mean ± sd`` over seeds; the sd left out when it is 0 (one seed, or a column equal
    by construction such as the parameter count)."""
    mean, sd = group.mean_sd(key)
    if not math.isfinite(mean):
        return "-"
    show = (lambda v: f"{v / 1e6:.2f}M") if spec == "M" else (lambda v: f"{v:{spec}}")
    return show(mean) + (f" ± {show(sd)}" if sd > 0 else "")


def aggregate_table(groups: list[Group]) -> dict:
    """One row per variant and role: mean ± sd over seeds of the columns some row has."""
    columns = [
        (key, title, spec)
        for key, title, spec in AGGREGATE_COLUMNS
        if any(math.isfinite(g.mean_sd(key)[0]) for g in groups)
    ]
    return {
        "titles": [title for _, title, _ in columns],
        "roles": len({g.role for g in groups}) > 1,
        "rows": [
            {
                "variant": g.variant,
                "kind": g.kind,
                "role": g.role,
                "seeds": len(g.runs),
                "cells": [_mean_sd_cell(g, key, spec) for key, _, spec in columns],
            }
            for g in groups
        ],
    }


def per_run_table(summaries: list[dict], baselines: list[dict]) -> dict:
    """The per-run comparison (every column the rows carry), for the details page."""
    rows = [*summaries, *baselines]
    columns = columns_present(rows)
    return {
        "columns": columns,
        "rows": [
            {
                "baseline": row.get("kind") == "baseline",
                "cells": [(_cell(row, col), col) for col in columns],
            }
            for row in rows
        ],
    }


def _plots(plots: dict[str, Path], names: tuple[str, ...], root: Path) -> list[dict]:
    return [
        {
            "name": name,
            "title": PLOT_TITLES.get(name, name),
            "src": Path(os.path.relpath(plots[name], root)).as_posix(),
        }
        for name in names
        if name in plots
    ]


def _header(meta: dict) -> dict:
    tasks, model = meta["probe_tasks"], meta["model"]
    return {
        "store": meta["store"],
        "model": str(model.get("name") or model.get("source")),
        "n_eval_tokens": int(meta["n_eval_tokens"]),
        "judge": meta["options"]["judge"],
        "splice": meta["splice"],
        "token_tasks": ", ".join(tasks["token"]),
        "n_sequence": len(tasks["sequence"]),
        "n_dropped": len(tasks["dropped"]),
    }


def index_page(root: Path, summary: dict, plots, latent_lists: list[dict]) -> str:
    """The comparison: the verdict figure first, then the seed-aggregated tables."""
    groups = group_runs(summary["variants"] + summary.get("baselines", []))
    trained = [g for g in groups if g.role == "trained"]
    others = [g for g in groups if g.role != "trained"]
    seeds = max((len(g.runs) for g in trained), default=0)
    return (
        environment()
        .get_template("index.html")
        .render(
            title=INDEX_TITLE,
            seeds=seeds,
            probe_k=PROBE_K,
            n_runs=len(summary["variants"]),
            trained=aggregate_table(trained),
            others=aggregate_table(others),
            verdict=_plots(plots, ("verdict",), root),
            plots=_plots(plots, INDEX_PLOTS[1:], root),
            latent_lists=latent_lists,
            recovery=_recovery(summary),
            **_header(summary),
        )
    )


def details_page(root: Path, summary: dict, plots) -> str:
    """Every run on its own row, and the diagnostic figures."""
    return (
        environment()
        .get_template("details.html")
        .render(
            title=f"{INDEX_TITLE}: per-run details",
            table=per_run_table(summary["variants"], summary.get("baselines", [])),
            plots=_plots(plots, DETAIL_PLOTS, root),
            **_header(summary),
        )
    )


def _write_pages(
    paths: ReportPaths, summary: dict, plots: dict[str, Path], latent_lists: list[dict]
) -> Path:
    details = paths.root / DETAILS
    details.write_text(details_page(paths.root, summary, plots), encoding="utf-8")
    paths.index.write_text(index_page(paths.root, summary, plots, latent_lists), encoding="utf-8")
    return paths.index


def write(
    paths: ReportPaths,
    summaries: list[dict],
    baselines: list[dict],
    meta: dict,
    plots: dict[str, Path],
    details: dict[str, list[LatentDetail]],
    hooks_of: dict[str, list[str]],
    slugs: dict[str, str],
) -> Path:
    """Every chosen latent's page, then the index and details pages (from the saved
    ``results.json``, which holds ``summaries``, ``baselines`` and ``meta``)."""
    skipped = logits_skipped_reason(meta)
    for name, items in details.items():
        for d in items:
            page = paths.latent_page(slugs[name], d.latent)
            page.parent.mkdir(parents=True, exist_ok=True)
            page.write_text(latent_page(d, hooks_of[name], skipped), encoding="utf-8")
    groups = group_runs([*summaries, *baselines])
    summary = read_summary(paths)
    return _write_pages(paths, summary, plots, _latent_lists(details, slugs, groups))


def saved_latent_lists(paths: ReportPaths, summary: dict) -> list[dict]:
    """The sampled latents of each run (``sampled.parquet``), for a report redrawn without
    its runs: the top picks are not saved, and pages link where the evaluation wrote them."""
    groups = group_runs(summary["variants"])
    variant_of = {name: g.variant for g in groups for name in g.names}
    out: dict[str, dict] = {}
    for row in read_rows(paths.table("sampled")):
        name = row["variant"]
        entry = out.setdefault(variant_of.get(name, name), {"runs": {}, "count": 0})
        runs = entry["runs"].setdefault(name, [])
        runs.append(
            {
                "href": f"latents/{slug(name)}/{row['latent']}.html",
                "latent": row["latent"],
                "purity": _fmt(row["purity"], "{:.2f}"),
                "rating": "-" if row["rating"] is None else str(row["rating"]),
                "fc": _fmt(row["fc"], "{:.2f}"),
                "d_eff": _fmt(row["d_eff"], "{:.2f}"),
                "first": (row["contexts"][0] if row["contexts"] else "")[:120],
            }
        )
        entry["count"] += 1
    return [
        {
            "name": variant,
            "count": entry["count"],
            "runs": [
                {"name": name, "groups": [{"label": RANDOM, "rows": rows}]}
                for name, rows in entry["runs"].items()
            ],
        }
        for variant, entry in out.items()
    ]


def rerender(paths: ReportPaths, labels: dict[str, dict] | None = None) -> Path:
    """Redraw a report's figures and pages from its saved tables alone (no runs, no
    store): what ``pipeline report`` does to an older or committed report. ``labels``:
    the runs' protocol records (``protocol.json``) for a report evaluated before
    ``pipeline run`` recorded them in ``results.json``."""
    plots = draw_plots(paths, labels)
    summary = read_summary(paths, labels)
    return _write_pages(paths, summary, plots, saved_latent_lists(paths, summary))
