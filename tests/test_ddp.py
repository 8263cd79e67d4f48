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

from pipeline.training.ddp import DistributedContext
from pipeline.training.manifest import CoderManifest
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


@pytest.fixture
def decoded_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FMX_DECODED_DIR", str(tmp_path / "decoded"))
    return tmp_path / "decoded"


@pytest.mark.parametrize("mode", ["resident", "memmap", "stream"])
def test_each_rank_gathers_only_its_rows_of_the_same_global_batches(tiny_store, decoded_dir, mode):
    """The ranks' batches put together are one process's batches, row for row (stream: one
    process with as many strata as ranks); each rank gathers, or decodes, about its share."""
    from pipeline.store.reader import ActivationStore
    from pipeline.training.loader import ActivationLoader

    store = ActivationStore(tiny_store)
    common = {"batch_size": 101, "mode": mode, "seed": 2, "window_bytes": 1 << 40}
    whole = ActivationLoader(store, **common, stream_strata=2)  # stream: one window an epoch
    ranks = [ActivationLoader(store, **common, share=(r, 2)) for r in range(2)]
    batches = list(whole.epoch(1, skip_batches=1))
    parts = [list(rank.epoch(1, skip_batches=1)) for rank in ranks]
    assert len(batches) == len(parts[0]) == len(parts[1])
    for batch, *halves in zip(batches, *parts, strict=True):
        torch.testing.assert_close(torch.cat(halves), batch, rtol=0, atol=0)
        rows = [DistributedContext(r, 2, r).rows(batch.shape[0]) for r in range(2)]
        assert [h.shape[0] for h in halves] == [s.stop - s.start for s in rows]
    read = [rank.reader.rows_read for rank in ranks]
    if mode == "stream":  # whole chunks: both ranks decode the chunk their boundary cuts
        widest = max(map(len, whole.decoder.chunk_rows))
        assert max(read) < whole.reader.rows_read
        assert sum(read) <= whole.reader.rows_read + 2 * widest  # epoch 1, epoch 2's look-ahead
    else:
        assert sum(read) == whole.reader.rows_read and max(read) - min(read) <= len(batches)


@pytest.fixture
def one_process_group():
    """A gloo group of one process: the collectives run; a 2-rank context sums only itself."""
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("coder", [CROSSCODER, {**FMXCODER, "activation": "topk"}])
def test_a_local_batch_gives_the_global_batch_loss(one_process_group, coder):
    """Given this rank's rows only (a loader with ``share``), the rank's loss and terms are
    what it computes from the global batch: masks are drawn for the global batch."""
    from pipeline.coders import build_coder, coder_config_from_dict

    model = build_coder(coder_config_from_dict({**coder, "n_layers": 4, "d_model": 8}))
    context = DistributedContext(1, 2, 1)
    context.check_batches(n_tokens=250, batch_size=101)  # steps of 101, 101, 48 rows
    for step, size in ((0, 101), (2, 48), (4, 101), (5, 48)):
        assert context.global_rows(step) == size
        batch = torch.randn(size, 4, 8, generator=torch.Generator().manual_seed(step))
        global_out = context.training_loss(model, batch, step, 10)
        local_out = context.training_loss(model, batch[context.rows(size)], step, 10)
        torch.testing.assert_close(local_out.loss, global_out.loss, rtol=0, atol=0)
        for name, term in global_out.terms.items():
            torch.testing.assert_close(local_out.terms[name], term, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="step 0: a batch of 7 rows is neither"):
        context.training_loss(model, torch.randn(7, 4, 8), 0, 10)
