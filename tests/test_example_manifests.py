"""Every manifest shipped in manifests/ validates, so the README's examples never rot."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.experiment.manifest import load_experiment, variant_manifests
from pipeline.manifests.harvest import load_harvest_manifest
from pipeline.training.manifest import load_coder_manifest

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"


@pytest.mark.parametrize("path", sorted(MANIFESTS.glob("harvest/*.yaml")), ids=lambda p: p.name)
def test_harvest_manifest_validates(path):
    load_harvest_manifest(path)


@pytest.mark.parametrize("path", sorted(MANIFESTS.glob("coders/*.yaml")), ids=lambda p: p.name)
def test_coder_manifest_validates(path):
    manifest, base = load_coder_manifest(path)
    assert (base / manifest.cache.harvest_manifest).is_file()


@pytest.mark.parametrize("path", sorted(MANIFESTS.glob("experiments/*.yaml")), ids=lambda p: p.name)
def test_experiment_manifest_validates(path):
    experiment, base = load_experiment(path)
    variants = variant_manifests(experiment, base, str(path))
    assert [m.name for m, _ in variants] == [v["name"] for v in experiment.variants]
    kinds = {m.coder["kind"] for m, _ in variants}
    assert {"crosscoder", "fmxcoder"} <= kinds  # every experiment compares the two
    # Targeted experiments (scale trend, trajectory reruns) leave out the per-layer SAEs;
    # the paper-comparison ones keep them as the probing baseline.
    if not path.stem.startswith(("scale-", "cpu-large-trajectories", "gemma3-270m-cpu-traj")):
        assert "per_layer_sae" in kinds
