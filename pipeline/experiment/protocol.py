"""The fair-comparison protocol of ``pipeline run``: which runs an experiment trains.

Per variant: a learning-rate sweep (short seed-0 runs, the lr with the lowest validation
FVU wins; never the test split), then one run per seed with that lr, an untrained control
per seed (zero steps: the initialised coder, evaluated like the trained one), and a
sparsity sweep (seed-0 runs per k) for the L0-FVU frontier. Every run is an ordinary
coder manifest, so each is resumable and skipped once finished.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from pipeline.coders import coder_config_from_dict
from pipeline.coders.cost import macs_per_token
from pipeline.experiment.manifest import ExperimentManifest, deep_merge
from pipeline.manifests.io import validate
from pipeline.paths import RunPaths
from pipeline.training.manifest import CoderManifest
from pipeline.training.trainer import read_step_time

Role = Literal["lr_sweep", "trained", "control", "sparsity"]


@dataclass(frozen=True)
class PlannedRun:
    variant: str  # the experiment's variant name
    role: Role
    seed: int
    manifest: CoderManifest
    base: Path

    @property
    def lr(self) -> float:
        return self.manifest.training.lr

    @property
    def k(self) -> int | None:
        return self.manifest.coder.get("k")

    def label(self) -> dict:
        lr = None if self.role == "control" else self.lr  # zero steps: no lr was used
        return {"variant": self.variant, "role": self.role, "seed": self.seed, "lr": lr}


def derive(manifest: CoderManifest, name: str, seed: int, source: str, **override) -> CoderManifest:
    """``manifest`` renamed, seeded (coder init and batch order) and overridden."""
    data = manifest.model_dump(mode="json")
    data = deep_merge(data, {"name": name, "coder": {"seed": seed}, "training": {"seed": seed}})
    return validate(CoderManifest, deep_merge(data, override), f"{source} ({name})")


def _suffix(seed: int, seeds: list[int]) -> str:
    return f" s{seed}" if len(seeds) > 1 else ""


def lr_sweep_run(
    manifest: CoderManifest, base: Path, lr: float, tokens: int, source: str
) -> PlannedRun:
    """One short seed-0 run of ``manifest`` at ``lr``."""
    name = f"{manifest.name} lr={lr:g}"
    m = derive(manifest, name, 0, source, training={"lr": lr, "tokens": tokens})
    return PlannedRun(manifest.name, "lr_sweep", 0, m, base)


def lr_sweep_runs(
    experiment: ExperimentManifest, variants: list[tuple[CoderManifest, Path]], source: str
) -> list[PlannedRun]:
    sweep = experiment.lr_sweep
    if sweep is None:
        return []
    return [
        lr_sweep_run(manifest, base, lr, sweep.tokens, source)
        for manifest, base in variants
        for lr in sweep.lrs
    ]


def beyond_edge(points: list[dict]) -> float | None:
    """The next lr to try when the best point is the lowest or highest lr tried (a step of
    the ratio between the two outermost lrs on that side), else None: a best lr at the
    edge of a grid says only that the optimum may lie further out."""
    lrs = sorted({p["lr"] for p in points})
    if len(lrs) < 2:
        return None
    best = choose_lr(points)
    if best == lrs[0]:
        return lrs[0] * lrs[0] / lrs[1]
    if best == lrs[-1]:
        return lrs[-1] * lrs[-1] / lrs[-2]
    return None


def protocol_runs(
    experiment: ExperimentManifest,
    variants: list[tuple[CoderManifest, Path]],
    source: str,
    lrs: dict[str, float] | None = None,
) -> list[PlannedRun]:
    """Trained (per seed), control (per seed) and sparsity-sweep runs; ``lrs`` overrides
    each variant's learning rate (the sweep's choice)."""
    seeds = experiment.seeds
    trained, controls, sparsity = [], [], []
    for manifest, base in variants:
        v = manifest.name
        lr = (lrs or {}).get(v, manifest.training.lr)
        for seed in seeds:
            m = derive(manifest, f"{v}{_suffix(seed, seeds)}", seed, source, training={"lr": lr})
            trained.append(PlannedRun(v, "trained", seed, m, base))
            if experiment.controls:
                name = f"{v} untrained{_suffix(seed, seeds)}"
                m = derive(manifest, name, seed, source, training={"lr": lr, "tokens": 0})
                controls.append(PlannedRun(v, "control", seed, m, base))
        own_k = manifest.coder.get("k")
        ks = experiment.sparsity_sweep.ks(v) if experiment.sparsity_sweep else []
        for k in ks:
            if own_k is None or k == own_k:
                continue  # no top-k to sweep, or the trained seed-0 run is that point
            m = derive(manifest, f"{v} k={k}", 0, source, training={"lr": lr}, coder={"k": k})
            sparsity.append(PlannedRun(v, "sparsity", 0, m, base))
    return trained + controls + sparsity


def cost_line(name: str, runs: list[PlannedRun]) -> str:
    """How many runs and how many training steps an experiment asks for."""
    by_role = {role: [r for r in runs if r.role == role] for role in get_args(Role)}
    steps = sum(r.manifest.total_steps() for r in runs)
    tokens = sum(r.manifest.total_steps() * r.manifest.training.batch_size for r in runs)
    parts = ", ".join(f"{len(rs)} {role.replace('_', '-')}" for role, rs in by_role.items() if rs)
    evaluated = sum(1 for r in runs if r.role in ("trained", "control"))
    return (
        f"pipeline run {name}: {len(runs)} runs ({parts}); {steps} training steps "
        f"({tokens:,} tokens) in all; {evaluated} coders evaluated"
    )


def final_validation(run_dir: Path) -> dict[str, float] | None:
    """The last ``val_fvu``/``val_l0`` a run logged (its final step), or None."""
    metrics = RunPaths(run_dir).metrics
    if not metrics.is_file():
        return None
    last = None
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if "val_fvu" in record:
            last = record
    if last is None:
        return None
    return {"step": last["step"], "val_fvu": last["val_fvu"], "val_l0": last["val_l0"]}


def run_cost(run_dir: Path) -> dict[str, float | None] | None:
    """Multiply-adds per token (``pipeline.coders.cost``, at the run's batch size) and the
    median step seconds its training recorded (None for an untrained control), or None
    when the run records no resolved coder config."""
    recorded = RunPaths(run_dir).manifest
    if not recorded.is_file():
        return None
    doc = json.loads(recorded.read_text())
    config = coder_config_from_dict(doc["coder"])
    macs = macs_per_token(config, doc["manifest"]["training"]["batch_size"])
    timing = read_step_time(run_dir)
    return {
        "macs_encode": macs.encode,
        "macs_decode": macs.decode,
        "macs_decode_sparse": macs.decode_sparse,
        "macs_step": macs.step,
        "step_s": timing["median_s"] if timing else None,
    }


def choose_lr(points: list[dict]) -> float:
    """The lr of the sweep point with the lowest finite ``val_fvu`` (the first on a tie)."""
    finite = [p for p in points if p.get("val_fvu") is not None and math.isfinite(p["val_fvu"])]
    if not finite:
        raise ValueError("lr sweep: no run logged a finite val_fvu (is validation_fraction 0?)")
    return min(finite, key=lambda p: p["val_fvu"])["lr"]
