"""A static HTML report: an index (comparison table, plots, sampled latents) and one page
per sampled latent (marked top contexts, activation histogram, per-layer decoder norms and
encoder contributions, logit effects). Plain files with relative links, no scripts, no
external assets; every piece of text goes through ``html.escape``.
"""

from __future__ import annotations

import math
import os
from html import escape
from pathlib import Path

import numpy as np

from pipeline.evaluation.latent_details import LatentDetail
from pipeline.evaluation.report import layer_number
from pipeline.evaluation.results import COMPARE_COLUMNS
from pipeline.evaluation.run_metrics import HIST_EDGES
from pipeline.paths import ReportPaths

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1.5em; max-width: 1150px;
  color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th:first-child, td:first-child, .text { text-align: left; }
tr.baseline td { color: #666; font-style: italic; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.context { font-family: monospace; font-size: 13px; white-space: pre-wrap; margin: 3px 0;
  padding: 4px 6px; background: #fafafa; border-left: 3px solid #ddd; }
mark { background: rgba(255, 140, 0, var(--a)); padding: 0 1px; }
mark.top { outline: 2px solid #c00; }
.note { color: #666; font-size: 13px; }
.grid { display: flex; flex-wrap: wrap; gap: 2em; }
"""


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )


def _fmt(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return fmt.format(value)


def _bars(values, labels, title: str, width: int = 420, height: int = 150) -> str:
    """A small SVG bar chart; labels under the bars, the title above."""
    values = np.nan_to_num(np.asarray(values, dtype=float))
    n = max(len(values), 1)
    top = float(values.max()) if values.size and values.max() > 0 else 1.0
    bar_w = (width - 20) / n
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 40}" '
        f'role="img" aria-label="{escape(title)}">',
        f'<text x="4" y="12" font-size="12">{escape(title)}</text>',
    ]
    step = max(1, n // 12)
    for i, (v, label) in enumerate(zip(values, labels, strict=True)):
        h = (height - 20) * v / top
        x = 10 + i * bar_w
        parts.append(
            f'<rect x="{x:.1f}" y="{height - h:.1f}" width="{max(bar_w - 1, 1):.1f}" '
            f'height="{h:.1f}" fill="#4a7fb5"><title>{escape(str(label))}: {v:.4g}'
            "</title></rect>"
        )
        if i % step == 0:
            parts.append(
                f'<text x="{x + bar_w / 2:.1f}" y="{height + 14}" font-size="10" '
                f'text-anchor="middle">{escape(str(label))}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)


def _context_html(context) -> str:
    peak = max(float(context.acts.max()), context.top_value, 1e-9)
    out = []
    for row, text, act in zip(
        context.rows.tolist(), context.texts, context.acts.tolist(), strict=True
    ):
        shown = escape(text)
        if act > 0 or row == context.top_row:
            cls = ' class="top"' if row == context.top_row else ""
            alpha = 0.15 + 0.85 * max(act, 0) / peak
            shown = f'<mark{cls} style="--a:{alpha:.2f}" title="{act:.3g}">{shown}</mark>'
        out.append(shown)
    value = f'<span class="note">({context.top_value:.3g})</span>'
    return f'<div class="context">{"".join(out)}  {value}</div>'


def latent_page(d: LatentDetail, hooks: list[str], slug: str) -> str:
    layers = [layer_number(h) for h in hooks]
    rating = "-" if d.rating is None else str(d.rating)
    stats = (
        "<table>"
        f"<tr><th>frequency</th><td>{d.frequency:.4%}</td></tr>"
        f"<tr><th>N_eff (reads from)</th><td>{_fmt(d.fc, '{:.2f}')}</td></tr>"
        f"<tr><th>D_eff (writes to)</th><td>{_fmt(d.d_eff, '{:.2f}')}</td></tr>"
        f"<tr><th>purity</th><td>{_fmt(d.purity, '{:.2f}')} "
        f"({escape(d.purity_class)})</td></tr>"
        f"<tr><th>judge rating</th><td>{escape(rating)}</td></tr>"
        f'<tr><th>explanation</th><td class="text">{escape(d.explanation)}</td></tr>'
        "</table>"
    )
    lo = HIST_EDGES[:-1]
    nonzero = np.flatnonzero(d.histogram)
    span = slice(nonzero.min(), nonzero.max() + 1) if nonzero.size else slice(0, len(lo))
    hist = _bars(
        d.histogram[span],
        [f"{v:.1f}" for v in lo[span]],
        "activation histogram (log10 activation, held-out tokens)",
    )
    charts = (
        '<div class="grid">'
        + hist
        + _bars(d.decoder_norms, layers, "decoder norm per layer (raw units)")
        + _bars(d.contributions, layers, "encoder contribution share per layer (top contexts)")
        + "</div>"
    )
    if d.logits_top:
        rows = "".join(
            f'<tr><td class="text">{escape(repr(a))}</td><td>{va:.3g}</td>'
            f'<td class="text">{escape(repr(b))}</td><td>{vb:.3g}</td></tr>'
            for (a, va), (b, vb) in zip(d.logits_top, d.logits_bottom, strict=True)
        )
        logits = (
            f"<h2>Logit effects</h2><p class='note'>decoder direction at "
            f"{escape(d.logit_layer)} through the final norm gain and W_U (logit lens)</p>"
            f"<table><tr><th>promoted</th><th></th><th>suppressed</th><th></th></tr>"
            f"{rows}</table>"
        )
    else:
        logits = (
            "<h2>Logit effects</h2><p class='note'>Omitted: the model was not loaded "
            "(evaluated with --no-splice), so its unembedding is not available.</p>"
        )
    contexts = "".join(_context_html(c) for c in d.contexts) or "<p>no contexts</p>"
    body = (
        f'<p><a href="../../index.html">&larr; back to the report</a></p>'
        f"<h1>{escape(d.variant)} &middot; latent {d.latent}</h1>{stats}{charts}"
        f"<h2>Top-activating contexts</h2><p class='note'>held-out tokens; highlighted tokens "
        f"are active (darker = stronger), the outlined one is the top token.</p>{contexts}"
        f"{logits}"
    )
    return _page(f"{d.variant} latent {d.latent}", body)


def _table(summaries: list[dict], baselines: list[dict]) -> str:
    head = "".join(
        f'<th class="text">{escape(title)}</th>' if key == "kind" else f"<th>{escape(title)}</th>"
        for key, title, _ in COMPARE_COLUMNS
    )
    rows = []
    for row in [*summaries, *baselines]:
        cells = []
        for key, _, fmt in COMPARE_COLUMNS:
            value = row.get(key)
            if key == "judge_good" and value is not None:
                text = f"{value}/{row.get('judge_rated', 0)}"
            else:
                text = _fmt(value, fmt)
            cells.append(
                f'<td class="text">{escape(text)}</td>'
                if key in ("variant", "kind")
                else f"<td>{escape(text)}</td>"
            )
        cls = ' class="baseline"' if row.get("kind") == "baseline" else ""
        rows.append(f"<tr{cls}>{''.join(cells)}</tr>")
    legend = (
        "<p class='note'>FVU, MSE (raw units), FC and D_eff are means over layers or alive "
        "latents; fragile: share of latents halved by masking one layer; F1@k: mean probe F1 "
        "with k latents; coherent: sampled latents rated >= 4 by the judge (purity >= 0.5 for "
        "the offline proxy); CE score: spliced-in loss recovered, mean over layers. Baselines "
        "pick their best layer by mean test F1.</p>"
    )
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>{legend}"


def _latent_row(d: LatentDetail, slug: str) -> str:
    rating = "-" if d.rating is None else str(d.rating)
    first = (d.contexts[0].marked() if d.contexts else "")[:120]
    return (
        f'<tr><td><a href="latents/{escape(slug)}/{d.latent}.html">{d.latent}</a></td>'
        f"<td>{_fmt(d.purity, '{:.2f}')}</td><td>{escape(rating)}</td>"
        f"<td>{_fmt(d.fc, '{:.2f}')}</td><td>{_fmt(d.d_eff, '{:.2f}')}</td>"
        f'<td class="text">{escape(first)}</td></tr>'
    )


def _recovery(meta: dict) -> str:
    """Planted caches only: recovery by kind and the span calibration of each metric."""
    recovery = meta.get("recovery")
    if not recovery:
        return ""
    kinds = ("single", "spanning", "cooccurring")
    metrics = sorted({m for r in recovery.values() for m in r["calibration"]})
    head = "".join(f"<th>recovered {k}</th>" for k in kinds) + "".join(
        f"<th>rho {escape(m)}</th>" for m in metrics
    )
    rows = []
    for name, r in recovery.items():
        s, cal = r["summary"], r["calibration"]
        cells = [_fmt(s["mmcs"], "{:.3f}"), _fmt(s["recovered"], "{:.0%}")]
        cells += [_fmt(s["by_kind"][k]["recovered"], "{:.0%}") for k in kinds]
        cells += [_fmt(cal.get(m, {}).get("spearman"), "{:.2f}") for m in metrics]
        rows.append(
            f'<tr><td class="text">{escape(name)}</td>'
            + "".join(f"<td>{escape(c)}</td>" for c in cells)
            + "</tr>"
        )
    return (
        "<h2>Planted-feature recovery</h2><table><tr><th class='text'>variant</th>"
        f"<th>MMCS</th><th>recovered</th>{head}</tr>{''.join(rows)}</table>"
        "<p class='note'>MMCS: mean over true features of the best cosine with a decoder row "
        "over all layers (raw units); recovered: share above 0.9; rho: Spearman correlation "
        "between a latent metric and the true layer span, over single and spanning features "
        "matched above 0.7.</p>"
    )


def index_page(root: Path, summaries, baselines, meta, plots, details, slugs) -> str:
    options, tasks = meta["options"], meta["probe_tasks"]
    intro = (
        f"<h1>fmxcoders evaluation</h1><p>cache <code>{escape(meta['store'])}</code>, "
        f"model {escape(str(meta['model'].get('name') or meta['model'].get('source')))}, "
        f"{meta['n_eval_tokens']:,} held-out tokens; judge {escape(options['judge'])}; "
        f"spliced-in loss: {escape(meta['splice'])}.</p>"
        f"<p class='note'>Probe tasks: token {escape(', '.join(tasks['token']) or 'none')}; "
        f"sequence {len(tasks['sequence'])}; dropped (a class missing on one side): "
        f"{len(tasks['dropped'])}.</p>"
    )
    images = "".join(
        f'<h3>{escape(name)}</h3><img src="{escape(os.path.relpath(path, root))}" '
        f'alt="{escape(name)}">'
        for name, path in plots.items()
    )
    lists = []
    for name, items in details.items():
        rows = "".join(_latent_row(d, slugs[name]) for d in items)
        lists.append(
            f"<h3>{escape(name)}</h3><table><tr><th>latent</th><th>purity</th><th>rating</th>"
            f"<th>N_eff</th><th>D_eff</th><th class='text'>top context</th></tr>{rows}</table>"
        )
    body = (
        f"{intro}<h2>Comparison</h2>{_table(summaries, baselines)}{_recovery(meta)}"
        f"<h2>Plots</h2>{images}"
        f"<h2>Sampled latents</h2>{''.join(lists)}"
    )
    return _page("fmxcoders evaluation", body)


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
    for name, items in details.items():
        for d in items:
            page = paths.latent_page(slugs[name], d.latent)
            page.parent.mkdir(parents=True, exist_ok=True)
            page.write_text(latent_page(d, hooks_of[name], slugs[name]), encoding="utf-8")
    paths.index.write_text(
        index_page(paths.root, summaries, baselines, meta, plots, details, slugs),
        encoding="utf-8",
    )
    return paths.index
