"""8-bit stores (int8, float8_e4m3): round trip within the format's bound, checksums, faults."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.harvest.cache_key import cache_key
from pipeline.manifests.harvest import HarvestManifest
from pipeline.store.format import FP8_TABLE, SCALES_FILE, codes_float32, dequantise, quantise
from pipeline.store.reader import ActivationStore, StoreError
from stages import harvest

EIGHT_BIT = ["int8", "float8_e4m3"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, ActivationStore]:
    """The tiny-random manifest harvested as bf16 and as each 8-bit dtype."""
    from tests.conftest import tiny_manifest_dict

    root = tmp_path_factory.mktemp("cache")
    out = {}
    for dtype in ["bfloat16", *EIGHT_BIT]:
        data = tiny_manifest_dict()
        data["storage"] = {**data.get("storage", {}), "dtype": dtype}
        out[dtype] = ActivationStore(harvest.run(HarvestManifest.model_validate(data), root).path)
    return out


def copy_store(store: ActivationStore, tmp_path: Path) -> Path:
    target = tmp_path / store.key
    shutil.copytree(store.paths.root, target)
    return target


def test_fp8_table_is_the_ocp_e4m3fn_format():
    """Checked against the format's definition, not torch: bias 7, 3 mantissa bits,
    subnormals below exponent 1, max 448, NaN at S.1111.111."""
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        exponent, mantissa = (code >> 3) & 0xF, code & 0x7
        if exponent == 0xF and mantissa == 0x7:
            assert np.isnan(FP8_TABLE[code])
            continue
        if exponent == 0:
            want = sign * mantissa / 8 * 2.0**-6
        else:
            want = sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)
        assert FP8_TABLE[code] == want, code
    assert np.nanmax(FP8_TABLE) == 448


@pytest.mark.parametrize("width", [576, 7])
def test_fp8_decode_of_every_code_pair_matches_the_table(width):
    """The two-codes-at-once lookup (even rows) and the one-code path (odd rows, strided
    views) give FP8_TABLE's value for every code in every position."""
    pairs = np.stack(np.meshgrid(np.arange(256), np.arange(256)), -1).reshape(-1, 2)
    codes = np.resize(pairs.astype(np.uint8).ravel(), (2 * 65536 // width + 1, width))
    for view in (codes, codes[:, ::2], codes[::3]):
        assert np.array_equal(codes_float32(view, "float8_e4m3"), FP8_TABLE[view], equal_nan=True)


@pytest.mark.parametrize("dtype", EIGHT_BIT)
def test_quantise_error_is_within_the_format_bound(dtype):
    """int8: half a step (absmax / 254); e4m3: 2^-4 of |x| (3 mantissa bits) or half the
    smallest subnormal step; planted massive rows and channels included."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 96, generator=generator)
    x[::50] *= 100  # massive tokens
    x[:, 7] *= 30  # a massive channel
    x[3] = 0
    codes, scales = quantise(x, dtype)
    back = dequantise(codes, scales, dtype)
    error = np.abs(back - x.numpy())
    absmax = np.abs(x.numpy()).max(1, keepdims=True)
    if dtype == "int8":
        bound = absmax / 254
    else:
        bound = np.maximum(np.abs(x.numpy()) / 16, scales[:, None] * 2.0**-10)
    assert (error <= bound * (1 + 1e-5) + 1e-30).all()
    assert (back[3] == 0).all() and scales[3] == 0


@pytest.mark.parametrize("dtype", EIGHT_BIT)
def test_store_round_trip_matches_the_bf16_store(stores, dtype):
    """The 8-bit store of the same manifest holds quantise(the bf16 store's values)."""
    bf16, eight = stores["bfloat16"], stores[dtype]
    assert eight.dtype == dtype and eight.key != bf16.key
    raw = bf16.read(0, bf16.n_tokens)
    got = eight.read(0, eight.n_tokens)
    for layer in range(bf16.n_layers):
        codes, scales = quantise(raw[:, layer], dtype)
        assert np.array_equal(eight.read_stored(0, eight.n_tokens, [layer])[:, 0], codes)
        assert np.array_equal(np.asarray(eight.scales[:, layer]), scales)
        assert torch.equal(got[:, layer], torch.from_numpy(dequantise(codes, scales, dtype)))
    attributes = eight.arrays[0].attrs
    assert attributes["dtype"] == dtype and SCALES_FILE in attributes["encoding"]
    assert eight.arrays[0].dtype == (np.int8 if dtype == "int8" else np.uint8)
    eight.verify()


def test_statistics_describe_the_dequantised_values(stores):
    eight = stores["int8"]
    values = eight.read(0, eight.n_tokens).double()
    keep = ~eight.tokens(columns=["is_special"])["is_special"].to_numpy(zero_copy_only=False)
    mean = values[torch.from_numpy(keep)].mean(0)
    assert torch.allclose(eight.stats["mean"], mean.float(), rtol=1e-5, atol=1e-6)


def test_bf16_key_is_unchanged_and_8bit_keys_differ(tiny_manifest):
    """The tiny-random bf16 key is pinned in tests/test_cache_key.py; 8-bit keys are new."""
    keys = {d: cache_key(tiny_manifest(**{"storage.dtype": d})) for d in ["bfloat16", *EIGHT_BIT]}
    assert cache_key(tiny_manifest()) == keys["bfloat16"]
    assert len(set(keys.values())) == 3


def test_8bit_with_zstd_gpu_is_refused(tiny_manifest, tmp_path):
    manifest = tiny_manifest(storage={"dtype": "int8", "codec": "zstd-gpu"})
    with pytest.raises(ValueError, match=r"storage\.dtype int8 needs codec zstd or none"):
        harvest.run(manifest, tmp_path)


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
def test_damaged_scales_file_is_named_in_one_line(stores, tmp_path, how):
    root = copy_store(stores["float8_e4m3"], tmp_path)
    path = root / SCALES_FILE
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
        problem = "checksum mismatch"
    elif how == "truncate":
        path.write_bytes(bytes(data[:-4]))
        problem = r"\d+ bytes, expected"
    else:
        path.unlink()
        problem = "file missing"
    with pytest.raises(StoreError, match=f"^{path}: {problem}") as caught:
        ActivationStore(root)
    assert "\n" not in str(caught.value)


def test_scales_file_dropped_from_the_record_is_refused(stores, tmp_path):
    """A record without the scales file (an edited or foreign store) cannot be read as 8-bit."""
    from pipeline.store.format import record_crc32c

    root = copy_store(stores["int8"], tmp_path)
    completion = root / "complete.json"
    record = json.loads(completion.read_text())
    record.pop("record_crc32c")
    del record["files"][SCALES_FILE]
    completion.write_text(json.dumps({**record, "record_crc32c": record_crc32c(record)}))
    with pytest.raises(StoreError, match=f"^{root / SCALES_FILE}: not in the completion record"):
        ActivationStore(root)


def test_flipped_code_chunk_is_caught_by_verify(stores, tmp_path):
    root = copy_store(stores["int8"], tmp_path)
    store = ActivationStore(root)
    chunk = store.paths.array(store.hook_names[1]) / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=f"^{chunk}: "):
        ActivationStore(root, verify=True)
