"""Data-parallel training (2 gloo ranks on CPU via torchrun) equals one process on the same
global batches, for a TopK crosscoder and a masked BatchTopK fmxcoder, and resumes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.ddp import DistributedContext
from pipeline.train_manifest import CoderManifest
from stages import train

PIPELINE = Path(sys.executable).with_name("pipeline")  # the console script torchrun runs
CROSSCODER = {"kind": "crosscoder", "n_latents": 96, "activation": "topk", "k": 6}
FMXCODER = {
    "kind": "fmxcoder",
    "n_latents": 96,
    "activation": "batchtopk",
    "k": 6,
    "encoder_factorization": "shared_basis",
    "decoder_factorization": "dense",
    "rank": 2,
    "masking_probability": 0.3,
    "collapse_coefficient": 0.1,
}
# An odd batch size: the ranks' halves differ by a row (the loss weighting is exercised),
# and the last batch of each epoch is a short one (556 train tokens = 5 x 101 + 51).
TRAINING = {
    "tokens": 101 * 24,
    "batch_size": 101,
    "checkpoint_every": 10,
    "log_every": 4,
    "validation_fraction": 0.0,
}


def manifests(store: Path, runs_root: Path) -> list[CoderManifest]:
    return [
        CoderManifest.model_validate(
            {
                "name": f"ddp-{coder['kind']}",
                "cache": {"key": store.name, "root": str(store.parent)},
                "coder": coder,
                "training": TRAINING,
                "run": {"runs_root": str(runs_root), "progress": False, "device": "cpu"},
            }
        )
        for coder in (CROSSCODER, FMXCODER)
    ]


def run_dirs(store: Path, runs_root: Path) -> dict[str, Path]:
    return {m.name: runs_root / store.name / m.run_hash() for m in manifests(store, runs_root)}


def torchrun(store: Path, runs_root: Path, workdir: Path) -> str:
    """``pipeline train`` on two gloo ranks; returns its stdout."""
    files = []
    for manifest in manifests(store, runs_root):
        path = workdir / f"{manifest.name}.yaml"
        path.write_text(manifest.model_dump_json())  # JSON is YAML
        files.append(str(path))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", str(PIPELINE), "train", *files]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def assert_same_weights(actual: Path, expected: Path) -> None:
    got = load_file(actual / "final" / "coder.safetensors")
    want = load_file(expected / "final" / "coder.safetensors")
    assert got.keys() == want.keys()
    for name in want:  # includes dead-latent counters and BatchTopK thresholds (buffers)
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def reference(tiny_store, tmp_path_factory) -> dict[str, Path]:
    """One process, the same manifests: what two ranks must reproduce."""
    root = tmp_path_factory.mktemp("single")
    train.run([(m, root) for m in manifests(tiny_store, root)])
    return run_dirs(tiny_store, root)


@pytest.fixture(scope="module")
def ddp_runs(tiny_store, tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("ddp")
    return root, torchrun(tiny_store, root, root)


def test_rank_rows_cover_every_batch_once():
    for batch in (2, 7, 101, 128):
        for world in (2, 3):
            rows = [DistributedContext(r, world, r).rows(batch) for r in range(world)]
            covered = [i for part in rows for i in range(part.start, part.stop)]
            assert covered == list(range(batch))
            sizes = [part.stop - part.start for part in rows]
            assert max(sizes) - min(sizes) <= 1


def test_batches_smaller_than_the_world_are_refused():
    context = DistributedContext(0, 2, 0)
    context.check_batches(556, 101)
    with pytest.raises(ValueError, match=r"training.batch_size: 5 over 556 .* batch of 1 rows"):
        context.check_batches(556, 5)  # 556 = 111 x 5 + 1: the last batch has one row


@pytest.mark.slow
def test_two_ranks_equal_one_process(reference, ddp_runs, tiny_store):
    root, stdout = ddp_runs
    for name, run_dir in run_dirs(tiny_store, root).items():
        assert stdout.count(f"{name} ") == 1, "rank 0 alone reports"
        assert_same_weights(run_dir, reference[name])
        steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
        assert steps == [4, 8, 12, 16, 20, 24], "rank 0 alone logs, once per step"
        kept = sorted(p.name for p in run_dir.glob("checkpoint-*"))  # rank 0: the newest two
        assert kept == ["checkpoint-000000010", "checkpoint-000000020"]


@pytest.mark.slow
def test_two_ranks_resume_from_a_checkpoint(reference, ddp_runs, tiny_store, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(ddp_runs[0], root)
    for run_dir in run_dirs(tiny_store, root).values():
        shutil.rmtree(run_dir / "final")  # as if killed after the step-20 checkpoint
    torchrun(tiny_store, root, tmp_path)
    for name, run_dir in run_dirs(tiny_store, root).items():
        assert_same_weights(run_dir, reference[name])
        steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
        assert steps == [4, 8, 12, 16, 20, 24], "the log is cut back to the checkpoint"
