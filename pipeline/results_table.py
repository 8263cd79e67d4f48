"""The paper's comparison table, from an evaluation's ``results.json``.

Columns in the paper's terms: mean probing F1 (and its change vs the per-layer SAEs),
reconstruction MSE (and its change vs the standard crosscoder), the floor FVU of a decoder
confined to a fixed subspace (blank where there is none, see ``pipeline.spectrum``), mean functional
coherence N_eff (and decoder-side D_eff), and the judge's coherent-latent count.
"""

from __future__ import annotations

import math
import re

PROBE_COLUMN = re.compile(r"^(token|sequence)_f1_k(\d+)$")


def _probe_f1(row: dict, k: int) -> float:
    """Mean of the token- and sequence-level mean F1 at ``k`` latents."""
    values = [
        v
        for name, v in row.items()
        if (m := PROBE_COLUMN.match(name)) and int(m.group(2)) == k and _finite(v)
    ]
    return sum(values) / len(values) if values else math.nan


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _change(value: float, reference: float | None) -> float:
    if reference is None or not (_finite(value) and _finite(reference)) or reference == 0:
        return math.nan
    return (value - reference) / abs(reference)


def probe_ks(summary: dict) -> list[int]:
    ks = {
        int(m.group(2)) for row in summary["variants"] for n in row if (m := PROBE_COLUMN.match(n))
    }
    return sorted(ks)


def paper_table(summary: dict, k: int | None = None) -> list[dict]:
    """One row per variant; ``k`` is the probing budget (default: the largest <= 10)."""
    ks = probe_ks(summary)
    if k is None:
        k = max([x for x in ks if x <= 10] or ks or [1])
    rows = summary["variants"]
    by_kind = {}
    for row in rows:
        by_kind.setdefault(row["kind"], row)
    crosscoder = by_kind.get("crosscoder")
    sae = by_kind.get("per_layer_sae")
    sae_f1 = _probe_f1(sae, k) if sae else None
    table = []
    for row in rows:
        f1 = _probe_f1(row, k)
        table.append(
            {
                "variant": row["variant"],
                "kind": row["kind"],
                "latents": row["n_latents"],
                "parameters": row["parameters"],
                "l0": row["l0"],
                "fvu": row["fvu"],
                "floor_fvu": row.get("floor_fvu"),  # None: the decoder has no floor
                "mse": row["mse"],
                "mse_change_vs_crosscoder": _change(row["mse"], crosscoder and crosscoder["mse"]),
                "probe_k": k,
                "probe_f1": f1,
                "probe_f1_points_vs_sae": 100 * (f1 - sae_f1) if sae_f1 is not None else math.nan,
                "fc_n_eff": row["fc"],
                "decoder_d_eff": row["d_eff"],
                "judge": row["judge"],
                "judge_good": row["judge_good"],
                "judge_rated": row["judge_rated"],
                "dead_fraction": row["dead_fraction"],
            }
        )
    return table


def _fmt(value: object, digits: int = 3) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def _blank_if_none(value: float | None) -> str:
    """The floor FVU column: blank for a decoder without a floor."""
    return "" if value is None else _fmt(float(value))


def _pct(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{100 * value:+.1f}%"


def render_markdown(table: list[dict], summary: dict) -> str:
    k = table[0]["probe_k"] if table else 0
    lines = [
        f"Held-out tokens: {summary.get('n_eval_tokens', '?')}; store {summary.get('store', '?')};"
        f" probing F1 = mean of token- and sequence-level mean F1 with k = {k} latents;"
        f" judge: {table[0]['judge'] if table else '?'}.",
        "",
        "| variant | kind | L0 | FVU | floor FVU | MSE | MSE vs crosscoder | probe F1 "
        "| vs SAE (pts) | N_eff | D_eff | coherent / rated | dead |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['variant']} | {r['kind']} | {_fmt(r['l0'], 1)} | {_fmt(r['fvu'])} "
            f"| {_blank_if_none(r.get('floor_fvu'))} | {_fmt(r['mse'], 4)} "
            f"| {_pct(r['mse_change_vs_crosscoder'])} "
            f"| {_fmt(r['probe_f1'])} | {_fmt(r['probe_f1_points_vs_sae'], 1)} "
            f"| {_fmt(r['fc_n_eff'], 2)} | {_fmt(r['decoder_d_eff'], 2)} "
            f"| {r['judge_good']} / {r['judge_rated']} | {_fmt(r['dead_fraction'], 3)} |"
        )
    return "\n".join(lines) + "\n"
