"""Experiment stage: one harvest, the protocol's runs trained from it, one evaluation, one
table.

The protocol (pipeline/experiment/protocol.py): a per-variant learning-rate sweep chosen on the
validation split, every variant once per seed, an untrained control per seed, and a
sparsity sweep for the L0-FVU frontier. Each step is skipped when its output exists
(cache hit, finished run), so an interrupted experiment resumes where it stopped; the
evaluation is reused only when its recorded provenance (weights' checksums, store key,
options, evaluation-code version) matches and all its report files are there.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.evaluation.results import run_id, stale_reason
from pipeline.experiment.frontier import plot_frontier, slug
from pipeline.experiment.manifest import ExperimentManifest, load_experiment, variant_manifests
from pipeline.experiment.protocol import (
    PlannedRun,
    beyond_edge,
    choose_lr,
    cost_line,
    final_validation,
    lr_sweep_run,
    lr_sweep_runs,
    protocol_runs,
    run_cost,
)
from pipeline.experiment.results_table import (
    protocol_table,
    recovery_table,
    render_frontier,
    render_markdown,
    render_recovery,
    render_trajectories,
    step_time_lines,
)
from pipeline.manifests.harvest import load_harvest_manifest
from pipeline.manifests.io import ManifestError
from pipeline.paths import ExperimentPaths, ReportPaths
from pipeline.store.format import atomic_write_json
from stages import evaluate, harvest, train


@dataclass(frozen=True)
class ExperimentResult:
    name: str
    results: Path
    table: list[dict]


def _train(planned: list[PlannedRun], device: str | None) -> dict[int, Path]:
    """Train (or skip, when finished) ``planned``; the run directory of each, by index."""
    manifests = []
    for p in planned:
        m = p.manifest
        if device:
            m = m.model_copy(update={"run": m.run.model_copy(update={"device": device})})
        manifests.append((m, p.base))
    results = train.run(manifests)
    by_name = {r.name: r.run_dir for r in results}
    return {i: by_name[p.manifest.name] for i, p in enumerate(planned)}


def _lr_sweep(
    experiment: ExperimentManifest, planned: list[PlannedRun], device: str | None
) -> dict[str, dict]:
    """Per variant: every sweep point (lr, validation FVU and L0) and the chosen lr."""
    if not planned:
        return {}
    if any(p.manifest.training.validation_fraction <= 0 for p in planned):
        raise ManifestError("lr_sweep needs training.validation_fraction > 0 (a validation split)")
    out: dict[str, dict] = {}
    sweep = experiment.lr_sweep
    for round_ in range(1 + (sweep.extend_at_edges if sweep else 0)):
        if round_ > 0:  # best at an edge of the grid: one more lr beyond it, per variant
            planned = _extensions(out, planned, sweep.tokens if sweep else 0)
            if not planned:
                break
            names = ", ".join(f"{p.variant} {p.lr:g}" for p in planned)
            print(f"lr sweep: best lr at the grid's edge; also trying {names}", flush=True)
        run_dirs = _train(planned, device)
        for i, p in enumerate(planned):
            val = final_validation(run_dirs[i]) or {}
            point = {"lr": p.lr, "val_fvu": val.get("val_fvu"), "val_l0": val.get("val_l0")}
            point |= {"tokens": p.manifest.training.tokens, "run_dir": run_id(run_dirs[i])}
            entry = out.setdefault(p.variant, {"points": [], "planned": p})
            entry["points"].append(point)
    for entry in out.values():
        entry.pop("planned")
        entry["points"].sort(key=lambda q: q["lr"])
        entry["chosen_lr"] = choose_lr(entry["points"])
        entry["chosen_by"] = "lowest val_fvu (validation split), seed 0"
        entry["at_edge"] = beyond_edge(entry["points"]) is not None
    return out


def _extensions(out: dict[str, dict], planned: list[PlannedRun], tokens: int) -> list[PlannedRun]:
    """The next sweep run of every variant whose best lr is still at an edge."""
    runs = []
    for entry in out.values():
        lr = beyond_edge(entry["points"])
        if lr is not None:
            first: PlannedRun = entry["planned"]
            variant = first.manifest.model_copy(update={"name": first.variant})
            runs.append(lr_sweep_run(variant, first.base, lr, tokens, "lr sweep"))
    return runs


def _frontier(planned: list[PlannedRun], run_dirs: dict[int, Path]) -> dict[str, list[dict]]:
    """Per variant with a sparsity sweep: (k, val L0, val FVU) of its sweep runs and its
    seed-0 trained run."""
    swept = {p.variant for p in planned if p.role == "sparsity"}
    lowest_seed = min((p.seed for p in planned if p.role == "trained"), default=0)
    out: dict[str, list[dict]] = {}
    for i, p in enumerate(planned):
        if p.variant not in swept or not (
            p.role == "sparsity" or (p.role == "trained" and p.seed == lowest_seed)
        ):
            continue
        val = final_validation(run_dirs[i])
        if val is not None:
            out.setdefault(p.variant, []).append({"k": p.k, **val, "run_dir": run_id(run_dirs[i])})
    for points in out.values():
        points.sort(key=lambda q: q["k"])
    return out


def run(
    path: str | Path, results_root: Path | None = None, device: str | None = None
) -> ExperimentResult:
    path = Path(path)
    experiment, base = load_experiment(path)
    harvest_path = base / experiment.harvest
    harvest_spec = load_harvest_manifest(harvest_path)
    if device:
        harvest_spec = harvest_spec.model_copy(
            update={"run": harvest_spec.run.model_copy(update={"device": device})}
        )
    variants = variant_manifests(experiment, base, str(path))
    sweep = lr_sweep_runs(experiment, variants, str(path))
    print(cost_line(experiment.name, sweep + protocol_runs(experiment, variants, str(path))))
    harvest.run(harvest_spec, manifest_source=str(harvest_path))

    root = Path(results_root or experiment.results_dir or Path("results")) / experiment.name
    paths = ExperimentPaths(root)
    paths.root.mkdir(parents=True, exist_ok=True)
    lr_sweep = _lr_sweep(experiment, sweep, device)
    if lr_sweep:
        atomic_write_json(root / "lr_sweep.json", lr_sweep)
    chosen = {v: entry["chosen_lr"] for v, entry in lr_sweep.items()}
    planned = protocol_runs(experiment, variants, str(path), chosen)
    run_dirs = _train(planned, device)

    evaluated = [i for i, p in enumerate(planned) if p.role in ("trained", "control")]
    eval_dirs = [run_dirs[i] for i in evaluated]
    report = ReportPaths(paths.report)
    labels = {run_id(run_dirs[i]): planned[i].label() for i in evaluated}
    options = evaluate.EvaluateOptions(
        judge=experiment.evaluation.judge,
        latents_sampled=experiment.evaluation.latents_sampled,
        max_tokens=experiment.evaluation.max_tokens,
        splice=experiment.evaluation.splice,
        splice_off_by="evaluation.splice: false in the experiment manifest",
        device=device or "auto",
        labels=labels,
    )
    stale = stale_reason(report, evaluate.expected_provenance(eval_dirs, options))
    if stale is None:
        print(f"evaluate: reusing {report.summary} (same weights, store, options and code)")
    else:
        print(f"evaluate: {len(eval_dirs)} runs ({stale})", flush=True)
        evaluate.run(eval_dirs, paths.report, options)

    summary = json.loads(report.summary.read_text())
    atomic_write_json(paths.protocol_labels, labels)  # read by `pipeline collate`
    costs = {run_id(run_dirs[i]): run_cost(run_dirs[i]) for i in evaluated}
    for row in summary["variants"]:  # each row holds its "protocol" label already (options)
        row["cost"] = costs.get(row["run_dir"])
    table = protocol_table(summary)
    for line in step_time_lines(summary):
        print(line)
    markdown = render_markdown(table, summary, lr_sweep) + render_recovery(recovery_table(summary))
    markdown += render_trajectories(table)
    frontier = _frontier(planned, run_dirs)
    if frontier:
        atomic_write_json(root / "frontier.json", frontier)
        for variant, points in frontier.items():
            plot_frontier(variant, points, root / f"frontier-{slug(variant)}.png")
        markdown += render_frontier(frontier)
    paths.table_json.write_text(json.dumps(table, indent=2) + "\n")
    paths.table_markdown.write_text(markdown)
    shutil.copyfile(path, paths.experiment_manifest)
    shutil.copyfile(harvest_path, paths.harvest_manifest)
    return ExperimentResult(experiment.name, paths.root, table)
