"""Harvest on the tiny random model: layout, exactness, caching, crash safety, integrity."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from pipeline.cli import main
from pipeline.harvest.cache_key import cache_key, hash_material
from pipeline.harvest.models import load_model
from pipeline.manifests.harvest import HarvestManifest, load_harvest_manifest
from pipeline.paths import StorePaths, incomplete_store_dir
from pipeline.store.reader import ActivationStore, StoreError
from pipeline.store.writer import StoreWriter
from stages import harvest
from tests.conftest import REPO, TINY_MANIFEST_FILE

WORKER = Path(__file__).with_name("harvest_worker.py")
TOKEN_COLUMNS = ["token_id", "doc_id", "position", "token_text", "is_special"]
DOCUMENT_COLUMNS = ["doc_id", "title", "language", "topic", "split"]
BOS, EOS = 256, 257  # the byte-level tokenizer of pipeline/harvest/tiny_model.py
N_HOOKS, N_BLOCKS = 4, 4  # tiny-random.yaml: 4 layers, 2048 tokens in chunks of 512


def store_fingerprint(root: Path) -> dict:
    """Everything a harvest decides: stored bytes, tables, stats, markers, crcs."""
    paths = StorePaths(root)
    record = json.loads(paths.completion.read_text())
    files = {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(paths.activations.rglob("*"))
        if p.is_file()
    }
    markers = {
        p.name: {k: v.tolist() for k, v in load_file(p).items()}
        for p in sorted(paths.blocks.glob("*.safetensors"))
    }
    manifest = json.loads(paths.manifest.read_text())
    return {
        "activation_files": files,
        "tokens": pq.read_table(paths.tokens).to_pydict(),
        "documents": pq.read_table(paths.documents).to_pydict(),
        "stats": {k: v.tolist() for k, v in load_file(paths.stats).items()},
        "markers": markers,
        "record": {
            k: v
            for k, v in record.items()
            if k not in ("harvest_seconds", "completed_at", "record_crc32c")
        }
        | {"files": {k: v for k, v in record["files"].items() if k != "manifest.json"}},
        "manifest": {k: v for k, v in manifest.items() if k != "source"},
    }


def assert_same_store(actual: Path, expected: Path) -> None:
    got, want = store_fingerprint(actual), store_fingerprint(expected)
    for part in want:
        assert got[part] == want[part], f"{part} differs from an uninterrupted harvest"


def count_write_blocks(monkeypatch) -> list[int]:
    written: list[int] = []
    original = StoreWriter.write_block

    def spy(self, block, stored, keep):
        written.append(block)
        return original(self, block, stored, keep)

    monkeypatch.setattr(StoreWriter, "write_block", spy)
    return written


def copy_store(store: Path, into: Path, name: str | None = None) -> Path:
    target = into / (name or store.name)
    shutil.copytree(store, target)
    return target


def chunk_file(store: Path, hook: str = "blocks.1.hook_resid_post", chunk: int = 2) -> Path:
    return StorePaths(store).array(hook) / "c" / str(chunk) / "0"


# --- layout ------------------------------------------------------------------------------


def test_store_shapes_and_record(tiny_store, tiny_manifest):
    manifest = tiny_manifest()
    store = ActivationStore(tiny_store)
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(4)]
    assert store.key == tiny_store.name == cache_key(manifest)
    assert store.hook_names == hooks
    assert (store.n_tokens, store.d_model, store.chunk_tokens, store.n_chunks) == (2048, 64, 512, 4)
    assert store.dtype == "bfloat16"
    for array in store.arrays:
        assert array.shape == (2048, 64)
        assert array.chunks == (512, 64)
        assert array.dtype == np.uint16  # bf16 bits; the real dtype is in the attributes
        assert array.attrs["dtype"] == "bfloat16"
    assert store.read(0, 10).shape == (10, 4, 64)
    assert store.read(100, 110, layers=[3, 1]).dtype == torch.float32
    record = store.record
    assert record["n_blocks"] == 4
    assert all(len(crcs) == 4 for crcs in record["block_crc32c"].values())
    assert sorted(p.name for p in StorePaths(tiny_store).blocks.iterdir()) == [
        f"{b:06d}.safetensors" for b in range(4)
    ]
    saved = store.manifest
    assert saved["key"] == store.key
    assert hash_material(saved["key_material"]) == store.key
    assert saved["manifest"] == manifest.model_dump(mode="json")
    assert (saved["d_model"], saved["model_n_layers"]) == (64, 4)
    assert not list(tiny_store.parent.glob("*.incomplete"))


def test_token_and_document_tables(tiny_store):
    store = ActivationStore(tiny_store)
    tokens, documents = store.tokens(), store.documents()
    assert tokens.column_names == TOKEN_COLUMNS
    assert documents.column_names == DOCUMENT_COLUMNS
    assert tokens.num_rows == store.n_tokens
    t = {name: tokens[name].to_numpy(zero_copy_only=False) for name in TOKEN_COLUMNS}
    assert np.array_equal(t["position"], np.tile(np.arange(32), 2048 // 32))
    window_starts = t["position"] == 0
    assert (t["token_id"][window_starts] == BOS).all()
    special = t["is_special"]
    assert np.array_equal(special, np.isin(t["token_id"], [BOS, EOS]))
    assert (t["doc_id"][special] == -1).all()
    assert (t["doc_id"][~special] >= 0).all()
    assert (np.diff(t["doc_id"][~special]) >= 0).all(), "documents are packed in order"
    assert (t["token_id"] == EOS).sum() >= 2, "several documents end inside the store"

    d = documents.to_pydict()
    assert d["doc_id"] == list(range(documents.num_rows))
    assert set(t["doc_id"][~special]) <= set(d["doc_id"])
    assert set(d["language"]) == {"en"}
    assert set(d["split"]) <= {"train", "test"}
    assert len(set(d["title"])) == len(d["title"])

    spec = HarvestManifest.model_validate(store.manifest["manifest"]).model
    tokenizer = load_model(spec, "cpu").tokenizer
    for doc in np.unique(t["doc_id"][~special])[:20].tolist():
        rows = np.flatnonzero(t["doc_id"] == doc)
        joined = "".join(t["token_text"][rows])
        assert joined == tokenizer.decode(t["token_id"][rows].tolist()), f"document {doc}"
    assert not any("\ufffd" in text for text in t["token_text"]), "a character was split"


def test_statistics_match_the_stored_values(tiny_store):
    store = ActivationStore(tiny_store)
    keep = ~store.tokens(["is_special"])["is_special"].to_numpy()
    values = store.read(0, store.n_tokens)[torch.from_numpy(keep)].double()
    norms = values.norm(dim=-1)
    stats = store.stats
    assert store.record["statistics_tokens"] == keep.sum()
    torch.testing.assert_close(stats["mean"], values.mean(0).float())
    torch.testing.assert_close(stats["mean_norm"], norms.mean(0).float())
    torch.testing.assert_close(stats["rms_norm"], norms.square().mean(0).sqrt().float())


# --- exactness ---------------------------------------------------------------------------


def assert_bf16_equal(stored: torch.Tensor, reference: torch.Tensor) -> None:
    """Equal after rounding the reference to bf16, but for rare 1-ulp flips (batch shapes)."""
    expected = reference.to(torch.bfloat16).float()
    differs = stored != expected
    assert differs.float().mean() <= 1e-3, f"{int(differs.sum())} values differ"
    ulp = expected.abs() * 2.0**-7 + 1e-30
    assert ((stored - expected).abs() <= ulp).all()


def direct_forward(model, token_ids: np.ndarray, hook_names: list[str]) -> torch.Tensor:
    """Full forward (no early stop) of all windows at once: ``[tokens, hooks, d]``."""
    with torch.inference_mode():
        _, cache = model.bridge.run_with_cache(torch.tensor(token_ids, dtype=torch.long))
    return torch.stack([cache[name].flatten(0, 1).float() for name in hook_names], dim=1)


def test_stored_equals_a_direct_forward(tiny_store, tiny_manifest):
    store = ActivationStore(tiny_store)
    model = load_model(tiny_manifest().model, "cpu")
    token_ids = store.tokens(["token_id"])["token_id"].to_numpy().reshape(-1, 32)
    reference = direct_forward(model, token_ids, store.hook_names)
    assert_bf16_equal(store.read(0, store.n_tokens), reference)


def test_other_hook_points_and_layer_subsets(tmp_path, tiny_manifest):
    manifest = tiny_manifest(
        hooks={"layers": [1, 3], "point": "mlp_out"},
        tokenization={"num_tokens": 512},
        storage={"chunk_tokens": 256},
        run={"batch_size": 3},  # batches that do not divide a block
    )
    store = ActivationStore(harvest.run(manifest, tmp_path).path, verify=True)
    assert store.hook_names == ["blocks.1.hook_mlp_out", "blocks.3.hook_mlp_out"]
    model = load_model(manifest.model, "cpu")
    token_ids = store.tokens(["token_id"])["token_id"].to_numpy().reshape(-1, 32)
    reference = direct_forward(model, token_ids, store.hook_names)
    assert_bf16_equal(store.read(0, store.n_tokens), reference)


def test_unknown_layer_is_a_one_line_cli_error(tmp_path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(TINY_MANIFEST_FILE.read_text() + "hooks:\n  layers: [0, 9]\n")
    result = CliRunner().invoke(main, ["harvest", str(manifest), "--cache-root", str(tmp_path)])
    assert result.exit_code == 1
    # transformers draws a weight-loading progress bar on stderr before the error
    assert result.output.endswith(
        "\nError: hooks.layers: layer 9 does not exist (the model has 4)\n"
    )
    assert "Traceback" not in result.output


# --- cache hits --------------------------------------------------------------------------


def refuse_to_compute(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("a cache hit must not load the model")

    monkeypatch.setattr(harvest, "load_model", fail)
    monkeypatch.setattr(StoreWriter, "write_block", fail)


def test_second_run_is_a_cache_hit(tiny_store, tiny_cache_root, tiny_manifest, monkeypatch):
    before = store_fingerprint(tiny_store)
    refuse_to_compute(monkeypatch)
    result = harvest.run(tiny_manifest(), tiny_cache_root)
    assert result.cache_hit
    assert result.path == tiny_store
    cosmetic = tiny_manifest(run={"batch_size": 2}, storage={"level": 5, "chunk_tokens": 256})
    assert harvest.run(cosmetic, tiny_cache_root).cache_hit
    assert store_fingerprint(tiny_store) == before


def test_cli_cache_hit(tiny_store, tiny_cache_root, monkeypatch):
    refuse_to_compute(monkeypatch)
    result = CliRunner().invoke(
        main, ["harvest", str(TINY_MANIFEST_FILE), "--cache-root", str(tiny_cache_root)]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{tiny_store.name}  cache hit  {tiny_store}\n"


def test_fully_marked_partial_store_only_finalises(
    tiny_store, tiny_manifest, monkeypatch, tmp_path
):
    """Killed after the last block marker: resuming writes no block, only the record."""
    partial = copy_store(tiny_store, tmp_path, f"{tiny_store.name}.incomplete")
    StorePaths(partial).completion.unlink()
    StorePaths(partial).stats.unlink()
    written = count_write_blocks(monkeypatch)
    result = harvest.run(tiny_manifest(), tmp_path)
    assert not result.cache_hit
    assert written == []
    assert_same_store(result.path, tiny_store)


# --- kill -9 and resume ------------------------------------------------------------------

KILL_AFTER_MARKERS = (0, 1, 3)
BLOCK_DELAY = 0.5


def start_worker(manifest, cache_root: Path, *extra: str) -> subprocess.Popen:
    spec = cache_root / "manifest.json"
    cache_root.mkdir(parents=True, exist_ok=True)
    spec.write_text(manifest.model_dump_json())
    command = [sys.executable, str(WORKER), str(spec), str(cache_root), *extra]
    return subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def partial_chunk_files(partial: Path) -> int:
    return sum(1 for p in StorePaths(partial).activations.glob("*/c/*/*") if p.is_file())


def marker_count(partial: Path) -> int:
    return len(list(StorePaths(partial).blocks.glob("*.safetensors")))


@pytest.fixture(scope="module")
def killed_harvests(tmp_path_factory) -> dict[int, Path]:
    """One harvest per k, started together, each SIGKILLed once it has k block markers.

    Each kill waits until the next block's chunks are partly on disk too (the worker
    writes junk into half of them, then pauses): k = 0 has chunk files and no marker.
    """
    manifest = load_harvest_manifest(TINY_MANIFEST_FILE)
    key = cache_key(manifest)
    roots = {k: tmp_path_factory.mktemp(f"killed-{k}") for k in KILL_AFTER_MARKERS}
    workers = {
        k: start_worker(manifest, root, "--block-delay", str(BLOCK_DELAY))
        for k, root in roots.items()
    }
    deadline = time.monotonic() + 120
    try:
        pending = dict(workers)
        while pending and time.monotonic() < deadline:
            for k, worker in list(pending.items()):
                partial = incomplete_store_dir(roots[k], key)
                markers = marker_count(partial)
                ready = markers >= k and partial_chunk_files(partial) > N_HOOKS * k
                if ready or worker.poll() is not None:
                    worker.send_signal(signal.SIGKILL)
                    worker.wait()
                    del pending[k]
            time.sleep(0.005)
    finally:
        for worker in workers.values():
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    for k, worker in workers.items():
        assert worker.returncode == -signal.SIGKILL, (k, worker.stderr.read()[-3000:])
    return roots


@pytest.mark.parametrize("k", KILL_AFTER_MARKERS)
def test_killed_harvest_resumes_to_an_identical_store(
    killed_harvests, k, tiny_store, tiny_manifest, monkeypatch
):
    root = killed_harvests[k]
    manifest = tiny_manifest()
    partial = incomplete_store_dir(root, cache_key(manifest))
    assert not (root / cache_key(manifest)).exists(), "the kill landed after completion"
    markers = marker_count(partial)
    assert markers == k
    assert partial_chunk_files(partial) > N_HOOKS * k, "chunks of an unmarked block are on disk"
    with pytest.raises(StoreError, match="not a finished store"):
        ActivationStore(partial)

    written = count_write_blocks(monkeypatch)
    result = harvest.run(manifest, root)
    assert not result.cache_hit
    assert sorted(written) == list(range(k, N_BLOCKS)), "only unmarked blocks are redone"
    assert not partial.exists()
    ActivationStore(result.path, verify=True)
    assert_same_store(result.path, tiny_store)


def test_concurrent_harvests_of_one_key(tmp_path, tiny_store, tiny_manifest):
    """Two processes, released together: one harvests, the other waits and hits the cache."""
    root = tmp_path / "cache"
    go = tmp_path / "go"
    workers = [
        start_worker(
            tiny_manifest(),
            root,
            "--block-delay",
            "0.2",
            "--ready",
            str(tmp_path / f"ready-{i}"),
            "--go",
            str(go),
        )
        for i in range(2)
    ]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready-{i}").exists() for i in range(2)):
            assert all(w.poll() is None for w in workers), [w.stderr.read() for w in workers]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        go.touch()
        outputs = [w.communicate(timeout=120) for w in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    assert [w.returncode for w in workers] == [0, 0], [err[-3000:] for _, err in outputs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert sorted(r["cache_hit"] for r in results) == [False, True]
    assert results[0]["path"] == results[1]["path"]
    stores = [p for p in root.iterdir() if p.is_dir()]
    assert [p.name for p in stores] == [tiny_store.name], "one store, no .incomplete left"
    ActivationStore(stores[0], verify=True)
    assert_same_store(stores[0], tiny_store)


# --- integrity ---------------------------------------------------------------------------


def test_truncated_chunk_is_refused_on_open(tiny_store, tmp_path):
    store = copy_store(tiny_store, tmp_path)
    chunk = chunk_file(store)
    size = chunk.stat().st_size
    os.truncate(chunk, size // 2)
    with pytest.raises(StoreError, match="truncated") as caught:
        ActivationStore(store)
    assert str(chunk) in str(caught.value)


def test_missing_chunk_is_refused_on_open(tiny_store, tmp_path):
    store = copy_store(tiny_store, tmp_path)
    chunk = chunk_file(store, "blocks.3.hook_resid_post", 0)
    chunk.unlink()
    with pytest.raises(StoreError, match="missing") as caught:
        ActivationStore(store)
    assert str(chunk) in str(caught.value)


def test_flipped_byte_fails_verification(tiny_store, tmp_path):
    store = copy_store(tiny_store, tmp_path)
    chunk = chunk_file(store)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    opened = ActivationStore(store)  # sizes still match: only decoding can tell
    with pytest.raises(StoreError) as caught:
        opened.verify()
    message = str(caught.value)
    assert message.startswith(f"{chunk}: "), message
    assert "checksum" in message.lower() and "re-harvest" in message
    with pytest.raises(StoreError):
        ActivationStore(store, verify=True)
    result = CliRunner().invoke(
        main, ["show", store.name, "--verify", "--cache-root", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert result.output == f"Error: {message}\n"


def test_store_without_completion_record_is_refused(tiny_store, tmp_path):
    store = copy_store(tiny_store, tmp_path)
    StorePaths(store).completion.unlink()
    with pytest.raises(StoreError, match="not a finished store"):
        ActivationStore(store)


# --- CLI: ls and show --------------------------------------------------------------------


def test_ls_lists_complete_and_incomplete_stores(tiny_store, tmp_path):
    copy_store(tiny_store, tmp_path)
    partial = copy_store(tiny_store, tmp_path, "0123456789abcdef.incomplete")
    StorePaths(partial).completion.unlink()
    result = CliRunner().invoke(main, ["ls", "--cache-root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["key", "status", "tokens", "layers", "size", "model"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows[tiny_store.name][1:4] == ["complete", "2048", "4"]
    assert rows["0123456789abcdef"][1:4] == ["incomplete", "2048", "4"]
    assert rows[tiny_store.name][-4:] == ["random", "4x64", "(seed", "0)"]


def test_ls_on_an_empty_root(tmp_path):
    result = CliRunner().invoke(main, ["ls", "--cache-root", str(tmp_path)])
    assert (result.exit_code, result.output) == (0, "no caches\n")


def test_show_verify(tiny_store, tiny_cache_root):
    prefix = tiny_store.name[:6]
    result = CliRunner().invoke(
        main, ["show", prefix, "--verify", "--cache-root", str(tiny_cache_root)]
    )
    assert result.exit_code == 0, result.output
    assert '"n_layers": 4' in result.output
    assert "tokens 2048  d_model 64  dtype bfloat16" in result.output
    for layer in range(4):
        assert f"blocks.{layer}.hook_resid_post" in result.output
    assert result.output.endswith("verified: every file and chunk matches its checksum\n")


def test_show_reports_store_errors_in_one_line(tiny_store, tmp_path):
    store = copy_store(tiny_store, tmp_path)
    chunk = chunk_file(store)
    os.truncate(chunk, 10)
    result = CliRunner().invoke(main, ["show", store.name, "--cache-root", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {chunk}: 10 bytes, expected ")
    assert result.output.count("\n") == 1

    missing = CliRunner().invoke(main, ["show", "feedface", "--cache-root", str(tmp_path)])
    assert missing.exit_code == 1
    assert missing.output == f"Error: no cache feedface under {tmp_path} (see `pipeline ls`)\n"


def test_show_names_the_command_for_an_incomplete_store(tiny_store, tmp_path):
    partial = copy_store(tiny_store, tmp_path, f"{tiny_store.name}.incomplete")
    StorePaths(partial).completion.unlink()
    result = CliRunner().invoke(main, ["show", tiny_store.name, "--cache-root", str(tmp_path)])
    assert result.exit_code == 1
    assert "incomplete" in result.output
    assert "pipeline harvest" in result.output
