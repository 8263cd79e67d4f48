"""The report redrawn from its saved tables alone (``html_report.rerender``, what
``pipeline report`` runs): runs fold into variants by seed and role, the index opens on the
verdict figure with one row per variant, every run keeps its row on the details page, and
no figure's legend lies on its axes. Uses a synthetic protocol-sized report (no runs)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.evaluation import html_report
from pipeline.evaluation.report import group_runs, layout_path, run_labels
from pipeline.evaluation.results import write_report_tables
from pipeline.paths import ReportPaths

LAYERS = [2, 5, 8, 11, 14]
KINDS = ("per_layer_sae", "crosscoder", "crosscoder", "fmxcoder", "fmxcoder", "fmxcoder")


def _run(variant: str, kind: str, seed: int, control: bool, rng) -> dict:
    """One summary row named and labelled as ``pipeline run`` names and labels its runs:
    seed 0's trained run is the lr sweep's, reused, so its name holds its lr, not a seed."""
    name = f"{variant} untrained s{seed}" if control else f"{variant} s{seed}"
    name = f"{variant} lr=0.001" if seed == 0 and not control else name
    role = "control" if control else "trained"
    protocol = {"variant": variant, "role": role, "seed": seed, "lr": None if control else 1e-3}
    f1 = rng.uniform(0.6, 0.8)
    return {
        "variant": name, "kind": kind, "step": 0 if control else 512, "run_dir": f"c/{name}",
        "protocol": protocol,
        "n_latents": 1024, "parameters": 2_000_000, "l0": 32.0,
        "layers": ",".join(f"blocks.{i}.hook_resid_post" for i in LAYERS),
        "fvu": rng.uniform(0.9, 1.0) if control else rng.uniform(0.2, 0.3),
        "mse": rng.uniform(0.1, 0.2), "fc": rng.uniform(1.0, 5.0), "d_eff": rng.uniform(1, 5),
        "dead_fraction": 0.0, "masking_fragile": 0.1, "token_f1_k5": f1,
        "sequence_f1_k5": f1 - 0.1, "token_f1_k1": f1 - 0.1, "judge": "purity",
        "judge_rated": 12, "judge_good": int(rng.integers(2, 10)), "ce_score": math.nan,
    }  # fmt: skip


def _long_tables(rows: list[dict], rng) -> dict[str, list[dict]]:
    per_layer, latents, probing, sampled, training = [], [], [], [], []
    for row in rows:
        name = row["variant"]
        for j, layer in enumerate(LAYERS):
            fvu = row["fvu"] * (1 + 0.05 * j)
            hook = f"blocks.{layer}.hook_resid_post"
            per_layer.append({"variant": name, "layer": j, "hook": hook, "fvu": fvu})
        for i in range(40):
            fc = float(rng.uniform(1, len(LAYERS)))
            latents.append({"variant": name, "latent": i, "alive": i % 10 != 0, "fc": fc,
                            "d_eff": fc, "traj_dec_top2": rng.uniform(0.5, 1),
                            "traj_dec_adjacent_cos": rng.uniform(-1, 1)})  # fmt: skip
        for task in ("token", "sequence"):
            for k in (1, 2, 5, 10):
                probing.append({"features": name, "task": task, "concept": "c", "k": k,
                                "f1": rng.uniform(0.5, 0.9)})  # fmt: skip
        for i in range(12):
            sampled.append({"variant": name, "latent": i, "rating": None, "explanation": "",
                            "purity": 0.5, "purity_class": "pure", "fc": 2.0, "d_eff": 2.0,
                            "contexts": ["a [[b]] c"]})  # fmt: skip
        if row["step"]:
            training += [{"variant": name, "step": s, "loss": 1e3 / s, "fvu": 1 / s, "l0": 32.0,
                          "val_fvu": None, "val_l0": None} for s in (8, 16, 32)]  # fmt: skip
    for layer in LAYERS:
        for k in (1, 2, 5, 10):
            for task in ("token", "sequence"):
                probing.append({"features": f"residual @ blocks.{layer}.hook_resid_post",
                                "task": task, "concept": "c", "k": k, "f1": 0.7})  # fmt: skip
    return {"per_layer": per_layer, "latents": latents, "probing": probing,
            "sampled": sampled, "training": training}  # fmt: skip


def synthetic_report(root: Path, n_variants: int, seeds: int, labelled: bool = True) -> ReportPaths:
    """A report directory as an evaluation of a protocol leaves it: ``n_variants`` variants
    x ``seeds`` seeds, an untrained control per seed, the residual and best-layer SAE
    baselines; plausible random numbers, no runs behind them. ``labelled=False``: as an
    evaluation before runs were labelled left it (the labels go to ``protocol.json`` in
    the directory above, as ``pipeline run`` writes them)."""
    rng = np.random.default_rng(0)
    variants = [(f"variant-{i}", KINDS[i % len(KINDS)]) for i in range(n_variants)]
    rows = [
        _run(v, kind, seed, control, rng)
        for control in (False, True)
        for v, kind in variants
        for seed in range(seeds)
    ]
    residual = {"sequence": "residual @ blocks.8.hook_resid_post",
                "token": "residual @ blocks.2.hook_resid_post"}  # fmt: skip
    baselines = [{"variant": "residual", "kind": "baseline", "features": residual,
                  "token_f1_k5": 0.75, "sequence_f1_k5": 0.6}]  # fmt: skip
    baselines += [
        {"variant": f"{row['variant']} (best layer)", "kind": "baseline", "features": residual,
         "token_f1_k5": 0.7, "sequence_f1_k5": 0.55}
        for row in rows if row["protocol"]["variant"] == "variant-0"
    ]  # fmt: skip
    meta = {
        "store": "synthetic", "model": {"name": "none"}, "n_eval_tokens": 4096,
        "options": {"judge": "purity"}, "splice": "skipped (synthetic)",
        "probe_tasks": {"token": ["c"], "sequence": [], "dropped": []},
    }  # fmt: skip
    paths = ReportPaths(root)
    tables = _long_tables(rows, rng)
    if not labelled:
        labels = {row["run_dir"]: row.pop("protocol") for row in rows}
        root.parent.mkdir(parents=True, exist_ok=True)
        (root.parent / "protocol.json").write_text(json.dumps(labels))
    write_report_tables(paths, {"variants": rows, "baselines": baselines, **meta}, tables)
    return paths


def _label(variant: str, role: str, seed: int) -> dict:
    return {"variant": variant, "role": role, "seed": seed}  # what `pipeline run` records


def test_runs_fold_by_their_protocol_labels_never_by_their_names() -> None:
    rows = [
        # seed 0 reused from the lr sweep: its name holds the lr, its label the seed
        {"variant": "fmx lr=0.003", "kind": "fmxcoder", "step": 9,
         "protocol": _label("fmx", "trained", 0)},
        {"variant": "fmx s1", "kind": "fmxcoder", "step": 9,
         "protocol": _label("fmx", "trained", 1)},
        {"variant": "fmx untrained s1", "kind": "fmxcoder", "step": 0,
         "protocol": _label("fmx", "control", 1)},
        {"variant": "mine s2", "kind": "crosscoder", "step": 9},  # unlabelled: its own variant
        {"variant": "zero untrained", "kind": "crosscoder", "step": 0},  # zero steps: a control
        {"variant": "fmx s1 (best layer)", "kind": "baseline"},
        {"variant": "fmx untrained s1 (best layer)", "kind": "baseline"},
        {"variant": "mine s2 (best layer)", "kind": "baseline"},
        {"variant": "residual", "kind": "baseline"},
    ]  # fmt: skip
    labels = [(lb.variant, lb.role, lb.seed) for lb in run_labels(rows)]
    assert labels == [
        ("fmx", "trained", 0),
        ("fmx", "trained", 1),
        ("fmx", "control", 1),
        ("mine s2", "trained", None),
        ("zero untrained", "control", None),
        ("fmx (best layer)", "baseline", 1),
        ("fmx untrained (best layer)", "baseline", 1),
        ("mine s2 (best layer)", "baseline", None),
        ("residual", "baseline", None),
    ]
    groups = group_runs(rows[:3])
    assert [(g.variant, g.role, len(g.runs)) for g in groups] == [
        ("fmx", "trained", 2),
        ("fmx", "control", 1),
    ]


def test_rerender_opens_on_the_verdict_with_one_row_per_variant(tmp_path: Path) -> None:
    paths = synthetic_report(tmp_path / "r", 3, 2)
    html_report.rerender(paths)
    index = paths.index.read_text()
    first_img = re.search(r'<img[^>]*src="([^"]+)"', index)
    assert first_img and first_img.group(1) == "plots/verdict.png"
    assert index.index("plots/verdict.png") < index.index("<table")
    variants_table = index.split("<h2>Variants</h2>")[1].split("</table>")[0]
    assert variants_table.count("<tr") == 1 + 3  # header and one row per trained variant
    assert "± " in variants_table  # mean ± sd over the 2 seeds
    details = (paths.root / "details.html").read_text()
    for run in ("variant-2 lr=0.001", "variant-2 s1", "variant-2 untrained s1", "residual"):
        assert f">{run}<" in details, run
    links = set(re.findall(r'(?:href|src)="([^"]+)"', index))
    assert "details.html" in links and "latents/variant-0-s1/3.html" in links
    for png in paths.plots.glob("*.png"):
        layout = json.loads(layout_path(png).read_text())
        assert layout["axes"], png.name


def _variants_rows(index: Path) -> int:
    return index.read_text().split("<h2>Variants</h2>")[1].split("</table>")[0].count("<tr") - 1


def test_cli_report_redraws_a_results_directory(tmp_path: Path) -> None:
    synthetic_report(tmp_path / "exp" / "report", 2, 2, labelled=False)
    result = CliRunner().invoke(main, ["report", str(tmp_path / "exp")])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith(str(tmp_path / "exp" / "report" / "index.html"))
    assert (tmp_path / "exp" / "report" / "plots" / "verdict.png").is_file()
    # results.json has no labels: the experiment's protocol.json folds the seeds
    assert _variants_rows(tmp_path / "exp" / "report" / "index.html") == 2
    bare = CliRunner().invoke(main, ["report", str(tmp_path / "exp" / "report")])
    assert bare.exit_code == 0, bare.output  # the report alone: every run its own variant
    assert _variants_rows(tmp_path / "exp" / "report" / "index.html") == 2 * 2
    missing = CliRunner().invoke(main, ["report", str(tmp_path / "nothing")])
    assert missing.exit_code != 0 and "results.json" in missing.output
