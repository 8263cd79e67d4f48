"""Two tiny trained runs (a per-layer SAE and an fmxcoder) on the session's tiny store,
for the export, runs-listing and Python API tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.training.manifest import CoderManifest
from stages import train

SAE = {"kind": "per_layer_sae", "latents_per_layer": 32, "activation": "topk", "k": 4}
FMX = {
    "kind": "fmxcoder",
    "n_latents": 64,
    "activation": "batchtopk",
    "k": 6,
    "encoder_factorization": "shared_basis",
    "decoder_factorization": "dense",
    "rank": 2,
}


@dataclass(frozen=True)
class TrainedRuns:
    cache_root: Path
    runs_root: Path
    key: str
    sae: Path
    fmx: Path


def manifest(name: str, spec: dict, cache_root: Path, key: str, runs_root: Path) -> CoderManifest:
    return CoderManifest.model_validate(
        {
            "name": name,
            "cache": {"key": key, "root": str(cache_root)},
            "coder": spec,
            "training": {"tokens": 2048, "batch_size": 256, "log_every": 2},
            "run": {"runs_root": str(runs_root), "progress": False},
        }
    )


def train_tiny_runs(tiny_cache_root: Path, runs_root: Path) -> TrainedRuns:
    """Train both runs (8 steps each, a few seconds) into ``runs_root``."""
    key = next(p.name for p in tiny_cache_root.iterdir() if p.is_dir())
    specs = [("tiny-sae", SAE), ("tiny-fmx", FMX)]
    manifests = [(manifest(n, s, tiny_cache_root, key, runs_root), Path(".")) for n, s in specs]
    sae, fmx = (r.run_dir for r in train.run(manifests))
    return TrainedRuns(tiny_cache_root, runs_root, key, sae, fmx)
