"""The paper's comparison table, from an evaluation's ``results.json``.

Columns in the paper's terms: mean probing F1 (and its change vs the per-layer SAEs),
reconstruction MSE (and its change vs the standard crosscoder), the floor FVU of a decoder
confined to a fixed subspace (blank where there is none, see ``pipeline.evaluation.spectrum``),
mean functional coherence N_eff (and decoder-side D_eff), and the judge's coherent-latent count.
Cost beside parameters: multiply-adds per token (``pipeline.coders.cost``), from a row's
``cost`` record (``protocol.run_cost``). Its measured step seconds stay out of the table,
which a rerun on another machine must rewrite byte for byte: ``step_time_lines`` says them.

``paper_table`` gives one row per evaluated run; ``protocol_table`` folds the runs of an
experiment's protocol (seeds, untrained controls) into one row per variant and role with
mean and sd over seeds, marks a trained metric whose mean lies within the seed spread of
its untrained control as not informative, and appends the raw-residual baseline.
"""

from __future__ import annotations

import math
import re
import statistics

PROBE_COLUMN = re.compile(r"^(token|sequence)_f1_k(\d+)$")

# Metrics compared against the untrained control (structural ones, L0 of a top-k coder,
# parameter and latent counts, are equal by construction and are not marked).
CONTROLLED = (
    "fvu",
    "mse",
    "mse_change_vs_crosscoder",
    "probe_f1",
    "probe_f1_points_vs_sae",
    "fc_n_eff",
    "fc_abs",
    "fc_ablation",
    "decoder_d_eff",
    "judge_good",
    "dead_fraction",
    "traj_dec_top2",
    "traj_dec_norm_top2",
    "traj_dec_adjacent_cos",
    "traj_enc_norm_top2",
)
# Trajectory statistics (pipeline.evaluation.trajectories): medians over alive latents.
TRAJECTORY_COLUMNS = tuple(
    f"traj_{side}_{stat}"
    for side in ("dec", "enc", "dec_norm", "enc_norm")
    for stat in ("top1", "top2", "top3", "adjacent_cos", "first_last_cos", "carry")
)
NOT_AVERAGED = {"seed", "probe_k", "lr", "judge_rated"}
# Cost columns (``protocol.run_cost``): multiply-adds per token, equal in every seed.
COST_COLUMNS = ("macs_encode", "macs_decode", "macs_decode_sparse", "macs_step")
NOT_INFORMATIVE = "†"
# Table column <- its 95% bootstrap interval in a summary row's ``bootstrap`` record
# (pipeline.evaluation.bootstrap); the table keeps ``<column>_lo`` and ``<column>_hi``.
INTERVALS = {"fvu": "fvu", "mse": "mse", "probe_f1": "probe_f1", "fc_n_eff": "fc"}
INTERVALS |= {"judge_good": "judge_good"}
INTERVAL_SUFFIXES = ("_lo", "_hi")
# Compared with the standard crosscoder of the same role (marked WITHIN_NOISE when inside
# the noise): the paper's comparisons.
VS_CROSSCODER = ("fvu", "mse", "probe_f1", "fc_n_eff", "judge_good")
WITHIN_NOISE = "≈"


def _probe_f1(row: dict, k: int) -> float:
    """Mean of the token- and sequence-level mean F1 at ``k`` latents."""
    values = [
        v
        for name, v in row.items()
        if (m := PROBE_COLUMN.match(name)) and int(m.group(2)) == k and _finite(v)
    ]
    return sum(values) / len(values) if values else math.nan


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _change(value: float, reference: float | None) -> float:
    if reference is None or not (_finite(value) and _finite(reference)) or reference == 0:
        return math.nan
    return (value - reference) / abs(reference)


def probe_ks(summary: dict) -> list[int]:
    ks = {
        int(m.group(2)) for row in summary["variants"] for n in row if (m := PROBE_COLUMN.match(n))
    }
    return sorted(ks)


def _default_k(summary: dict) -> int:
    ks = probe_ks(summary)
    return max([x for x in ks if x <= 10] or ks or [1])


def _group(row: dict) -> tuple:
    """Runs compared with each other: the same protocol role and seed (if annotated)."""
    protocol = row.get("protocol") or {}
    return protocol.get("role"), protocol.get("seed")


def paper_table(summary: dict, k: int | None = None) -> list[dict]:
    """One row per run; ``k`` is the probing budget (default: the largest <= 10). A run's
    MSE and F1 changes are against the crosscoder / per-layer SAE of its own role and seed."""
    k = _default_k(summary) if k is None else k
    rows = summary["variants"]
    reference: dict[tuple, dict] = {}
    for row in rows:
        reference.setdefault((row["kind"], *_group(row)), row)
    table = []
    for row in rows:
        crosscoder = reference.get(("crosscoder", *_group(row)))
        sae = reference.get(("per_layer_sae", *_group(row)))
        sae_f1 = _probe_f1(sae, k) if sae else None
        f1 = _probe_f1(row, k)
        protocol = row.get("protocol") or {}
        table.append(
            {
                "variant": protocol.get("variant", row["variant"]),
                "run": row["variant"],
                "role": protocol.get("role", "trained"),
                "seed": protocol.get("seed"),
                "lr": protocol.get("lr"),
                "kind": row["kind"],
                "latents": row["n_latents"],
                "parameters": row["parameters"],
                **{key: (row.get("cost") or {}).get(key) for key in COST_COLUMNS},
                "l0": row["l0"],
                "fvu": row["fvu"],
                "floor_fvu": row.get("floor_fvu"),
                "mse": row["mse"],
                "mse_change_vs_crosscoder": _change(row["mse"], crosscoder and crosscoder["mse"]),
                "probe_k": k,
                "probe_f1": f1,
                "probe_f1_points_vs_sae": 100 * (f1 - sae_f1) if sae_f1 is not None else math.nan,
                "fc_n_eff": row["fc"],
                "fc_abs": row.get("fc_abs"),
                "fc_ablation": row.get("fc_ablation"),
                "decoder_d_eff": row["d_eff"],
                "judge": row["judge"],
                "judge_good": row["judge_good"],
                "judge_rated": row["judge_rated"],
                "dead_fraction": row["dead_fraction"],
                **{key: row.get(key) for key in TRAJECTORY_COLUMNS},
                **_intervals(row, k),
            }
        )
    return table


def _intervals(row: dict, k: int) -> dict:
    """``<column>_lo/_hi`` from the row's bootstrap record (the probe's only at this k)."""
    record = row.get("bootstrap") or {}
    out: dict = {}
    for column, name in INTERVALS.items():
        bounds = record.get(name)
        if bounds is None or (column == "probe_f1" and record.get("probe_k") != k):
            continue
        out[f"{column}_lo"], out[f"{column}_hi"] = bounds
    if record.get("probe_k") == k and record.get("probe_topk_changed") is not None:
        out["probe_topk_changed"] = record["probe_topk_changed"]
    return out


def spread(row: dict, key: str) -> float:
    """The larger of the seed sd and the bootstrap interval's half-width (0 if neither)."""
    sd = row.get(f"{key}_sd")
    lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    half = (hi - lo) / 2 if _finite(lo) and _finite(hi) else 0.0
    return max(sd if _finite(sd) else 0.0, half)


def within_noise(a: dict, b: dict, key: str) -> bool:
    """|a - b| <= the sum of the two spreads (``spread``)."""
    if not (_finite(a.get(key)) and _finite(b.get(key))):
        return False
    return abs(a[key] - b[key]) <= spread(a, key) + spread(b, key)


def _mean_sd(values: list) -> tuple[float, float] | None:
    finite = [float(v) for v in values if _finite(v)]
    if not finite:
        return None
    sd = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return statistics.fmean(finite), sd


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (variant, role): numeric columns become their mean over seeds, with the
    sample sd beside them as ``<column>_sd``; ``seeds`` counts the runs folded."""
    groups: dict[tuple, list[dict]] = {}
    for row in runs:
        groups.setdefault((row["variant"], row["role"]), []).append(row)
    out = []
    for (variant, role), rows in groups.items():
        first = rows[0]
        merged: dict = {"variant": variant, "role": role, "seeds": len(rows)}
        for key, value in first.items():
            if key in merged or key in ("run", "seed"):
                continue
            numeric = [r.get(key) for r in rows]
            if key.endswith(INTERVAL_SUFFIXES) or key == "probe_topk_changed":
                merged[key] = (_mean_sd(numeric) or (math.nan,))[0]  # mean over seeds
            elif key not in NOT_AVERAGED and any(_finite(v) for v in numeric):
                mean, sd = _mean_sd(numeric)
                merged[key], merged[f"{key}_sd"] = mean, sd
            elif key not in NOT_AVERAGED and all(isinstance(v, int | float) for v in numeric):
                merged[key], merged[f"{key}_sd"] = math.nan, math.nan  # nan in every seed
            else:
                merged[key] = value
        merged["not_informative"] = []
        out.append(merged)
    return out


def mark_uninformative(rows: list[dict]) -> list[dict]:
    """Mark a trained row's metric when |trained mean - control mean| <= the sum of their
    spreads, each the larger of the seed sd and the bootstrap half-width: training did not
    move it measurably. With one seed the sd is 0 and the bootstrap alone sets the noise."""
    controls = {r["variant"]: r for r in rows if r["role"] == "control"}
    for row in rows:
        control = controls.get(row["variant"])
        if row["role"] != "trained" or control is None:
            continue
        row["not_informative"] = [key for key in CONTROLLED if within_noise(row, control, key)]
    return rows


def mark_vs_crosscoder(rows: list[dict]) -> list[dict]:
    """``within_noise_of_crosscoder``: the metrics of a row that do not differ from the
    (first) standard crosscoder of the same role by more than the two spreads."""
    crosscoders: dict[str, dict] = {}
    for row in rows:
        if row.get("kind") == "crosscoder":
            crosscoders.setdefault(row["role"], row)
    for row in rows:
        reference = crosscoders.get(row["role"])
        if reference is None or reference is row or row["role"] != "trained":
            continue
        row["within_noise_of_crosscoder"] = [
            key for key in VS_CROSSCODER if within_noise(row, reference, key)
        ]
    return rows


BEST_LAYER = " (best layer)"


def baseline_table(summary: dict, k: int) -> list[dict]:
    """The raw-residual and per-layer SAE best-layer probing baselines (probe F1 only); a
    per-layer SAE's best-layer rows are folded over seeds like its own rows."""
    protocol = {row["variant"]: row.get("protocol") for row in summary["variants"]}
    runs = []
    for b in summary.get("baselines", []):
        label, role = b["variant"], "baseline"
        owner = protocol.get(label.removesuffix(BEST_LAYER)) if label.endswith(BEST_LAYER) else None
        if owner:
            untrained = " untrained" if owner["role"] == "control" else ""
            label = f"{owner['variant']}{untrained}{BEST_LAYER}"
        runs.append({"variant": label, "role": role, "kind": "baseline", "probe_k": k,
                     "probe_f1": _probe_f1(b, k)})  # fmt: skip
    return aggregate(runs)


def protocol_table(summary: dict, k: int | None = None) -> list[dict]:
    """Trained rows, then untrained controls, then baselines (see the module docstring)."""
    k = _default_k(summary) if k is None else k
    rows = mark_vs_crosscoder(mark_uninformative(aggregate(paper_table(summary, k))))
    order = {"trained": 0, "control": 1}
    rows.sort(key=lambda r: order.get(r["role"], 2))  # stable: variant order kept
    return rows + baseline_table(summary, k)


def _fmt(value: object, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def _pct(value: float | None) -> str:
    if value is None:
        return ""
    return "n/a" if not math.isfinite(value) else f"{100 * value:+.1f}%"


def _cell(row: dict, key: str, digits: int = 3, fmt=None) -> str:
    """``mean ± sd`` over seeds (just the mean for one seed), ``†`` when not informative."""
    if key not in row:
        return ""
    show = fmt or (lambda v: _fmt(v, digits))
    text = show(row[key])
    sd = row.get(f"{key}_sd")
    if (row.get("seeds") or 0) > 1 and _finite(sd) and _finite(row[key]):
        text += f" ± {show(sd).lstrip('+')}"
    lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    if _finite(lo) and _finite(hi):
        text += f" [{show(lo)}, {show(hi)}]"
    if key in row.get("not_informative", ()):
        text += f" {NOT_INFORMATIVE}"
    if key in row.get("within_noise_of_crosscoder", ()):
        text += f" {WITHIN_NOISE}"
    return text


def _lr(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


def _count(row: dict, key: str) -> str:
    value = row.get(key)
    return "" if value is None else f"{value:,.0f}" if _finite(value) else "n/a"


def _macs(value: object) -> str:
    return f"{value / 1e6:.3g}M" if _finite(value) else ""


def _cost(row: dict) -> str:
    """``enc / dec (sparse) / step`` multiply-adds per token, blank for an older record."""
    if not _finite(row.get("macs_step")):
        return ""
    sparse = row.get("macs_decode_sparse")
    dec = _macs(row["macs_decode"]) + (f" ({_macs(sparse)})" if _finite(sparse) else "")
    return f"{_macs(row['macs_encode'])} / {dec} / {_macs(row['macs_step'])}"


def step_time_lines(summary: dict) -> list[str]:
    """Median training step seconds per trained variant (mean over seeds), from the rows'
    ``cost`` records: what ``pipeline run`` prints, as they differ between machines."""
    seconds: dict[str, list[float]] = {}
    for row in summary["variants"]:
        protocol, cost = row.get("protocol") or {}, row.get("cost") or {}
        if protocol.get("role", "trained") == "trained" and _finite(cost.get("step_s")):
            seconds.setdefault(protocol.get("variant", row["variant"]), []).append(cost["step_s"])
    return [
        f"step s (median, this machine): {variant} {statistics.fmean(values):.3f}"
        f" over {len(values)} run(s)"
        for variant, values in seconds.items()
    ]


def _outlier_note(summary: dict) -> str:
    outliers = summary.get("outliers") or {}
    if not outliers.get("excluded_tokens"):
        return ""
    share = max(outliers.get("energy_share") or [0.0])
    return (
        f" {outliers['excluded_tokens']} massive-activation tokens (norm above "
        f"{outliers['ratio']:g}x the layer median; up to {share:.0%} of a layer's squared "
        "norm) are excluded from training, validation, evaluation and normalisation."
    )


def render_markdown(table: list[dict], summary: dict, lr_sweep: dict | None = None) -> str:
    k = table[0]["probe_k"] if table else 0
    judge = next((r["judge"] for r in table if "judge" in r), "?")
    seeds = max((r.get("seeds") or 0 for r in table), default=0)
    lines = [
        f"Held-out tokens: {summary.get('n_eval_tokens', '?')}; store {summary.get('store', '?')};"
        f" probing F1 = mean of token- and sequence-level mean F1 with k = {k} latents;"
        f" judge: {judge}; mean ± sd over {seeds} seed(s) per row.{_outlier_note(summary)}",
        "",
        "| variant | role | seeds | lr | parameters | MACs/token (enc / dec (sparse) / step) "
        "| L0 | FVU | floor FVU | MSE "
        "| MSE vs crosscoder | probe F1 | vs SAE (pts) | N_eff | N_eff abs | N_eff ablation "
        "| D_eff | coherent / rated | dead |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        rated = r.get("judge_rated")
        coherent = f"{_cell(r, 'judge_good', 1)} / {_fmt(rated)}" if rated is not None else ""
        lines.append(
            f"| {r['variant']} | {r['role']} | {_fmt(r.get('seeds'))} | {_lr(r.get('lr'))} "
            f"| {_count(r, 'parameters')} | {_cost(r)} | {_cell(r, 'l0', 1)} | {_cell(r, 'fvu')} "
            f"| {_fmt(r.get('floor_fvu'))} | {_cell(r, 'mse', 4)} "
            f"| {_cell(r, 'mse_change_vs_crosscoder', fmt=_pct)} | {_cell(r, 'probe_f1')} "
            f"| {_cell(r, 'probe_f1_points_vs_sae', 1)} | {_cell(r, 'fc_n_eff', 2)} "
            f"| {_cell(r, 'fc_abs', 2)} | {_cell(r, 'fc_ablation', 2)} "
            f"| {_cell(r, 'decoder_d_eff', 2)} | {coherent} | {_cell(r, 'dead_fraction')} |"
        )
    lines += [
        "",
        f"{NOT_INFORMATIVE} not informative: the trained mean lies within the noise of the "
        "untrained (random-init) control of the same variant (|difference| <= sum of the two "
        "spreads, each the larger of the seed sd and the bootstrap interval's half-width). "
        "Controls have zero training steps and are evaluated exactly like the trained runs; "
        "baseline rows are probes on raw features (probe F1 only).",
        "",
        "MACs/token: multiply-adds per token of the encoder, the decoder over all latents "
        "(in brackets: over the k active ones, the path inference and TopK training take) "
        "and one training step at the run's batch size, forward and backward as the code "
        "runs them (pipeline/coders/cost.py). Measured seconds per step are in each run's "
        "step_time.json and printed by pipeline run, not kept here (they differ per machine).",
        *_noise_notes(table, summary),
    ]
    if lr_sweep:
        lines += ["", "Learning rate per variant (lowest validation FVU, seed 0):", ""]
        lines += ["| variant | lr | validation FVU per lr |", "|---|---|---|"]
        for variant, entry in lr_sweep.items():
            points = ", ".join(f"{p['lr']:g}: {_fmt(p.get('val_fvu'))}" for p in entry["points"])
            edge = " (at the grid's edge)" if entry.get("at_edge") else ""
            lines.append(f"| {variant} | {entry['chosen_lr']:g}{edge} | {points} |")
    return "\n".join(lines) + "\n"


def _noise_notes(table: list[dict], summary: dict) -> list[str]:
    """The footnotes on intervals, the crosscoder comparison and the probe's stability."""
    record = next((r.get("bootstrap") for r in summary["variants"] if r.get("bootstrap")), None)
    if record is None:
        return []
    lines = [
        "",
        f"[lo, hi]: {record['level']:.0%} bootstrap interval over {record['resamples']} "
        f"resamples of the {record['n_docs']} held-out documents (the probe refitted and its "
        "latents re-chosen in each; the coherent count resamples the rated latents), the mean "
        f"of each seed's bounds. {WITHIN_NOISE}: within the noise of the standard crosscoder "
        "of the same role (same rule as †). One seed at small size checks the pipeline; it is "
        "not evidence.",
    ]
    stability = [
        f"{r['variant']} {r['probe_topk_changed']:.0%}"
        for r in table
        if r["role"] == "trained" and _finite(r.get("probe_topk_changed"))
    ]
    if stability:
        k = record.get("probe_k")
        lines += [
            "",
            f"Probe top-{k} latent set different from the full data's, share of bootstrap "
            f"fits (trained): {', '.join(stability)}.",
        ]
    return lines


def render_frontier(frontier: dict[str, list[dict]]) -> str:
    """The sparsity sweep's L0-FVU points per variant (validation split, seed 0)."""
    lines = [
        "",
        "L0-FVU frontier (validation split, seed 0; one run per k):",
        "",
        "| variant | k | L0 | validation FVU |",
        "|---|---|---|---|",
    ]
    for variant, points in frontier.items():
        for p in points:
            lines.append(
                f"| {variant} | {p['k']} | {_fmt(p['val_l0'], 1)} | {_fmt(p['val_fvu'])} |"
            )
    return "\n".join(lines) + "\n"


RECOVERY_KINDS = ("single", "spanning", "cooccurring")


def recovery_table(summary: dict) -> list[dict]:
    """Planted caches: per variant and role, MMCS, the share of true features recovered
    (all, and by kind) and each coherence metric's Spearman correlation with the true layer
    span, as mean and sd over seeds (``aggregate``)."""
    labels = {row["variant"]: row.get("protocol") for row in summary["variants"]}
    runs = []
    for name, entry in (summary.get("recovery") or {}).items():
        label = labels.get(name) or {"variant": name, "role": "trained"}
        s = entry["summary"]
        row = {"variant": label["variant"], "role": label["role"]}
        row |= {"mmcs": s["mmcs"], "recovered": s["recovered"]}
        row |= {f"recovered_{k}": s["by_kind"].get(k, {}).get("recovered") for k in RECOVERY_KINDS}
        for metric, cal in sorted(entry["calibration"].items()):
            row[f"rho_{metric}"] = cal.get("spearman")
        runs.append(row)
    return aggregate(runs)


def render_recovery(rows: list[dict]) -> str:
    """The planted-feature recovery table (empty for a cache without planted truth)."""
    if not rows:
        return ""
    metrics = sorted({k for r in rows for k in r if k.startswith("rho_") and not k.endswith("_sd")})
    head = ["variant", "role", "MMCS", "recovered", *(f"{k}" for k in RECOVERY_KINDS)]
    head += [f"ρ({m.removeprefix('rho_')}, span)" for m in metrics]
    lines = [
        "",
        "Planted-feature recovery (test split): MMCS = mean over true features of the best "
        "cosine with a decoder row over all layers; recovered = share above 0.9; ρ = Spearman "
        "correlation of a latent metric with the true layer span of its matched feature.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [r["variant"], r["role"], _cell(r, "mmcs"), _cell(r, "recovered")]
        cells += [_cell(r, f"recovered_{k}") for k in RECOVERY_KINDS]
        cells += [_cell(r, m, 2) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


TRAJECTORY_TABLE = (
    ("traj_dec_norm_top1", "dec top1 (norm.)"),
    ("traj_dec_norm_top2", "dec top2 (norm.)"),
    ("traj_dec_norm_top3", "dec top3 (norm.)"),
    ("traj_dec_top2", "dec top2 (raw)"),
    ("traj_enc_norm_top2", "enc top2 (norm.)"),
    ("traj_dec_norm_adjacent_cos", "dec adjacent cos"),
    ("traj_dec_norm_first_last_cos", "dec first-last cos"),
    ("traj_dec_norm_carry", "dec layers carrying (norm.)"),
    ("traj_dec_carry", "dec layers carrying (raw)"),
)


def render_trajectories(table: list[dict]) -> str:
    """Median trajectory statistics per variant and role (trained beside its untrained
    control); empty when no row has them (per-layer SAEs only, or an older evaluation)."""
    rows = [r for r in table if _finite(r.get("traj_dec_top2"))]
    if not rows:
        return ""
    lines = [
        "",
        "Trajectory statistics (pipeline.evaluation.trajectories; medians over alive latents "
        "of each run's [L, d] weights, then mean ± sd over seeds): energy share in the top "
        "1/2/3 singular directions, mean cosine between adjacent carrying layers, cosine "
        "between the first and last carrying layers, layers carrying the latent (norm >= 0.25 "
        "of its peak layer's). norm.: every layer at the same mean norm (the training loss's "
        "units); raw: the residual's own units, where late layers' larger norms dominate.",
        "",
        "| variant | role | " + " | ".join(title for _, title in TRAJECTORY_TABLE) + " |",
        "|" + "---|" * (len(TRAJECTORY_TABLE) + 2),
    ]
    for r in rows:
        cells = [r["variant"], r["role"], *(_cell(r, key, 2) for key, _ in TRAJECTORY_TABLE)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
