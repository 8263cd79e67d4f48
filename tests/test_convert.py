"""``pipeline convert``: an 8-bit store derived from a bf16 one equals the direct harvest."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.harvest.cache_key import cache_key
from pipeline.manifests.harvest import HarvestManifest
from pipeline.paths import StorePaths, incomplete_store_dir
from pipeline.store.format import SCALES_FILE
from pipeline.store.reader import ActivationStore
from pipeline.store.writer import StoreWriter, estimate_store_bytes
from stages import convert, harvest
from tests.conftest import tiny_manifest_dict
from tests.helpers import almost_full


def manifest(dtype: str) -> HarvestManifest:
    data = tiny_manifest_dict()
    data["storage"] = {**data.get("storage", {}), "dtype": dtype}
    return HarvestManifest.model_validate(data)


@pytest.fixture(scope="module")
def bf16(tmp_path_factory) -> ActivationStore:
    root = tmp_path_factory.mktemp("cache")
    return ActivationStore(harvest.run(manifest("bfloat16"), root).path)


def same_store_contents(a: ActivationStore, b: ActivationStore) -> None:
    assert a.key == b.key and a.dtype == b.dtype
    for name in (SCALES_FILE, "tokens.parquet", "documents.parquet", "stats.safetensors"):
        assert (a.paths.root / name).read_bytes() == (b.paths.root / name).read_bytes(), name
    assert np.array_equal(a.read_stored(0, a.n_tokens), b.read_stored(0, b.n_tokens))
    assert a.record["block_crc32c"] == b.record["block_crc32c"]


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3"])
def test_convert_equals_harvesting_the_8bit_manifest(bf16, tmp_path, dtype):
    """Planted truth: a direct harvest with storage.dtype set runs the model; convert does
    not. Same key, same bytes."""
    local = tmp_path / "cache"
    shutil.copytree(bf16.paths.root, local / bf16.key)
    result = convert.run(bf16.key[:8], dtype, local)
    assert not result.cache_hit and result.key == cache_key(manifest(dtype))
    direct = ActivationStore(harvest.run(manifest(dtype), tmp_path / "direct").path)
    converted = ActivationStore(result.path, verify=True)
    same_store_contents(converted, direct)
    assert converted.manifest["converted_from"] == bf16.key
    assert convert.run(bf16.key, dtype, local).cache_hit


def test_killed_convert_resumes_and_redoes_only_unmarked_blocks(bf16, tmp_path, monkeypatch):
    local = tmp_path / "cache"
    shutil.copytree(bf16.paths.root, local / bf16.key)
    original = StoreWriter.write_block
    written: list[int] = []

    def dies_after_two(writer, block, stored, keep):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        original(writer, block, stored, keep)
        written.append(block)

    monkeypatch.setattr(StoreWriter, "write_block", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        convert.run(bf16.key, "int8", local)
    key = cache_key(manifest("int8"))
    assert len(list(StorePaths(incomplete_store_dir(local, key)).blocks.iterdir())) == 2
    monkeypatch.setattr(StoreWriter, "write_block", original)
    resumed: list[int] = []

    def counting(writer, block, stored, keep):
        resumed.append(block)
        original(writer, block, stored, keep)

    monkeypatch.setattr(StoreWriter, "write_block", counting)
    result = convert.run(bf16.key, "int8", local)
    assert sorted(resumed) == sorted(set(range(bf16.n_chunks)) - set(written))
    direct = ActivationStore(harvest.run(manifest("int8"), tmp_path / "direct").path)
    same_store_contents(ActivationStore(result.path, verify=True), direct)


def test_cli_convert_and_its_one_line_refusals(bf16, tmp_path):
    local = tmp_path / "cache"
    shutil.copytree(bf16.paths.root, local / bf16.key)
    runner = CliRunner()
    ok = runner.invoke(main, ["convert", bf16.key, "--dtype", "int8", "--cache-root", str(local)])
    assert ok.exit_code == 0, ok.output
    new_key = ok.output.split()[0]
    cases = {
        "already int8": [new_key, "--dtype", "float8_e4m3"],
        "no cache nothere": ["nothere", "--dtype", "int8"],
        "'bfloat16' is not one of": [bf16.key, "--dtype", "bfloat16"],
    }
    for expected, args in cases.items():
        out = runner.invoke(main, ["convert", *args, "--cache-root", str(local)])
        assert out.exit_code != 0 and expected in out.output, out.output
        assert "Traceback" not in out.output
    assert "pipeline convert" in runner.invoke(main, ["convert", "--help"]).output


def test_convert_refuses_up_front_when_the_store_cannot_fit(bf16, tmp_path, monkeypatch):
    """The disk check names the need before any block is written; the estimate is an upper
    bound on what the converted store really takes."""
    local = tmp_path / "cache"
    shutil.copytree(bf16.paths.root, local / bf16.key)
    done = convert.run(bf16.key, "int8", local)
    real = sum(p.stat().st_size for p in done.path.rglob("*") if p.is_file())
    assert estimate_store_bytes(bf16.n_tokens, bf16.n_layers, bf16.d_model, "int8") >= real
    shutil.rmtree(done.path)
    almost_full(monkeypatch)
    out = CliRunner().invoke(
        main, ["convert", bf16.key, "--dtype", "int8", "--cache-root", str(local)]
    )
    assert out.exit_code != 0 and "Traceback" not in out.output
    assert "this convert (uncompressed upper bound) needs about" in out.output
    assert not incomplete_store_dir(local, done.key).exists(), "a store was started"
