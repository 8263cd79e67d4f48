"""Experiment stage: one harvest, every variant trained from it, one evaluation, one table.

Each step is skipped when its output exists (cache hit, finished run, evaluation of the
same runs), so an interrupted experiment resumes where it stopped.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.evaluation.results import run_id
from pipeline.experiment_manifest import load_experiment, variant_manifests
from pipeline.harvest_manifest import load_harvest_manifest
from pipeline.paths import ExperimentPaths, ReportPaths
from pipeline.results_table import paper_table, render_markdown
from stages import evaluate, harvest, train


@dataclass(frozen=True)
class ExperimentResult:
    name: str
    results: Path
    table: list[dict]


def _evaluation_is_current(summary: Path, run_dirs: list[Path]) -> bool:
    if not summary.is_file():
        return False
    done = {row["run_dir"] for row in json.loads(summary.read_text())["variants"]}
    return done == {run_id(p) for p in run_dirs}


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
    harvest.run(harvest_spec, manifest_source=str(harvest_path))

    variants = variant_manifests(experiment, base, str(path))
    if device:
        variants = [
            (m.model_copy(update={"run": m.run.model_copy(update={"device": device})}), b)
            for m, b in variants
        ]
    trained = train.run(variants)
    run_dirs = [r.run_dir for r in trained]

    root = Path(results_root or experiment.results_dir or Path("results")) / experiment.name
    paths = ExperimentPaths(root)
    paths.root.mkdir(parents=True, exist_ok=True)
    report = ReportPaths(paths.report)
    if not _evaluation_is_current(report.summary, run_dirs):
        options = evaluate.EvaluateOptions(
            judge=experiment.evaluation.judge,
            latents_sampled=experiment.evaluation.latents_sampled,
            max_tokens=experiment.evaluation.max_tokens,
            splice=experiment.evaluation.splice,
            splice_off_by="evaluation.splice: false in the experiment manifest",
            device=device or "auto",
        )
        evaluate.run(run_dirs, paths.report, options)

    summary = json.loads(report.summary.read_text())
    table = paper_table(summary)
    paths.table_json.write_text(json.dumps(table, indent=2) + "\n")
    paths.table_markdown.write_text(render_markdown(table, summary))
    shutil.copyfile(path, paths.experiment_manifest)
    shutil.copyfile(harvest_path, paths.harvest_manifest)
    return ExperimentResult(experiment.name, paths.root, table)
