"""The loader's contract: every selected token once per epoch, seeded order, exact resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.manifests.harvest import HarvestManifest
from pipeline.store.format import from_storage_numpy
from pipeline.store.reader import ActivationStore
from pipeline.training.loader import ActivationLoader, Normaliser, split_rows
from stages import harvest
from tests.helpers import TINY, harvest_tiny

MODES = ["resident", "memmap", "stream"]


@pytest.fixture(autouse=True)
def decoded_dir(tmp_path, monkeypatch) -> Path:
    """memmap mode's decoded files go to a per-test folder, never the shared data dir."""
    monkeypatch.setenv("FMX_DECODED_DIR", str(tmp_path / "decoded"))
    return tmp_path / "decoded"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ActivationStore:
    return ActivationStore(harvest_tiny(tmp_path_factory.mktemp("cache")))


def _row_ids(loader: ActivationLoader, epoch: int) -> list[float]:
    """Identify rows by their (unique) raw-unit value of one coordinate triple."""
    ids = []
    for batch in loader.epoch(epoch):
        raw = loader.normaliser.invert(batch)
        ids.extend(raw[:, 0, :3].sum(-1).tolist())
    return ids


def _expected_ids(store: ActivationStore, rows: np.ndarray) -> list[float]:
    raw = store.read(0, store.n_tokens)[rows]
    return raw[:, 0, :3].sum(-1).tolist()


@pytest.mark.parametrize("mode", MODES)
def test_every_train_token_once_per_epoch(store, mode):
    loader = ActivationLoader(store, batch_size=100, mode=mode, buffer_chunks=2, seed=3)
    rows = split_rows(store, "train")
    assert loader.n_tokens == rows.size
    seen = _row_ids(loader, 0)
    assert len(seen) == rows.size
    assert sorted(seen) == pytest.approx(sorted(_expected_ids(store, rows)), abs=1e-4)


def _sorted_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows in an order fixed by their values: epochs of different modes compare equal."""
    flat = x.flatten(1)
    keys = flat[:, :8].double() @ torch.logspace(0, 7, 8, dtype=torch.float64)
    return flat[torch.argsort(keys)]


@pytest.mark.parametrize("centre", [False, True])
def test_every_mode_serves_the_normalised_stored_values_bit_for_bit(store, centre):
    """Resident and memmap normalise in numpy on a CPU (in their loader threads), stream in
    torch: an epoch of each, rows sorted, equals Normaliser.apply on the stored rows."""
    rows = split_rows(store, "train")
    normaliser = Normaliser.from_store(store, list(range(store.n_layers)), centre)
    stored = from_storage_numpy(store.read_stored(0, store.n_tokens), store.dtype)
    expected = normaliser.apply(stored[torch.from_numpy(rows)])

    for mode in MODES:
        loader = ActivationLoader(store, batch_size=100, mode=mode, centre=centre, seed=1)
        served = torch.cat(list(loader.epoch(0)))
        loader.close()
        assert torch.equal(_sorted_rows(served), _sorted_rows(expected)), mode


def test_chunks_without_split_rows_lose_nothing(tmp_path):
    """A buffer group with no row of the split must not shift the prefetched groups."""
    manifest = {**TINY, "storage": {"chunk_tokens": 32}}
    small_chunks = ActivationStore(
        harvest.run(HarvestManifest.model_validate(manifest), tmp_path).path
    )
    rows = split_rows(small_chunks, "test")
    per_chunk = np.bincount(rows // small_chunks.chunk_tokens, minlength=small_chunks.n_chunks)
    assert (per_chunk == 0).any()
    loader = ActivationLoader(
        small_chunks, batch_size=40, split="test", mode="stream", buffer_chunks=1
    )
    seen = _row_ids(loader, 0)
    assert sorted(seen) == pytest.approx(sorted(_expected_ids(small_chunks, rows)), abs=1e-4)


def test_splits_are_document_disjoint_and_skip_special_tokens(store):
    tokens = store.tokens()
    documents = store.documents().to_pandas().set_index("doc_id")
    for split in ("train", "test"):
        rows = split_rows(store, split)
        assert not tokens["is_special"].to_numpy(zero_copy_only=False)[rows].any()
        doc_ids = np.unique(tokens["doc_id"].to_numpy()[rows])
        assert set(documents.loc[doc_ids, "split"]) == {split}
    both = np.intersect1d(split_rows(store, "train"), split_rows(store, "test"))
    assert both.size == 0


@pytest.mark.parametrize("mode", MODES)
def test_order_is_seeded_and_differs_between_epochs(store, mode):
    first = ActivationLoader(store, batch_size=64, mode=mode, buffer_chunks=2, seed=1)
    again = ActivationLoader(store, batch_size=64, mode=mode, buffer_chunks=2, seed=1)
    other = ActivationLoader(store, batch_size=64, mode=mode, buffer_chunks=2, seed=2)
    assert _row_ids(first, 0) == _row_ids(again, 0)
    assert _row_ids(first, 0) != _row_ids(first, 1)
    assert _row_ids(first, 0) != _row_ids(other, 0)


@pytest.mark.parametrize("mode", MODES)
def test_skip_batches_resumes_the_same_stream(store, mode):
    loader = ActivationLoader(store, batch_size=48, mode=mode, buffer_chunks=1, seed=5)
    full = list(loader.epoch(2))
    resumed = list(loader.epoch(2, skip_batches=7))
    assert len(resumed) == len(full) - 7
    for a, b in zip(full[7:], resumed, strict=True):
        assert torch.equal(a, b)


def test_normalised_layers_have_mean_norm_sqrt_d(store):
    loader = ActivationLoader(store, batch_size=512, split="all", centre=False)
    norms = torch.cat([b.norm(dim=-1) for b in loader.epoch(0)])
    # bf16 storage: the statistics were taken on the stored values, so this is tight
    assert norms.mean(0).numpy() == pytest.approx(
        np.full(store.n_layers, store.d_model**0.5), rel=1e-3
    )


def test_normaliser_round_trips():
    mean, scale = torch.randn(3, 8), torch.rand(3) + 0.5
    normaliser = Normaliser(mean, scale, centre=True)
    x = torch.randn(5, 3, 8)
    assert torch.allclose(normaliser.invert(normaliser.apply(x)), x, atol=1e-5)


def test_layer_selection(store):
    loader = ActivationLoader(store, batch_size=32, layers=[1, 3], split="test")
    batch = next(iter(loader.epoch(0)))
    assert batch.shape == (32, 2, store.d_model)


def test_unknown_mode_is_rejected(store):
    with pytest.raises(ValueError, match="loader mode"):
        ActivationLoader(store, batch_size=8, mode="magic")


@pytest.mark.parametrize("mode", MODES)
def test_batches_cover_many_chunks(store, mode):
    """A real shuffle: the first batch draws from (nearly) every chunk, not a few."""
    loader = ActivationLoader(store, batch_size=64, mode=mode, seed=4)
    first = loader.normaliser.invert(next(iter(loader.epoch(0))))[:, 0, :3].sum(-1)
    raw = store.read(0, store.n_tokens)[:, 0, :3].sum(-1)
    rows = [int(torch.argmin((raw - value).abs())) for value in first.tolist()]
    chunks = {row // store.chunk_tokens for row in rows}
    assert len(chunks) == store.n_chunks


def test_stream_window_bounds_the_shuffle(store):
    """A one-batch window: each batch is one stretch of the chunk-ordered rows (at most the
    two chunks its boundary cuts), shuffled within."""
    loader = ActivationLoader(store, batch_size=16, mode="stream", window_bytes=1)
    assert loader.describe()["window_rows"] == 16  # at least one batch per window
    rows = split_rows(store, "train")
    stored = from_storage_numpy(store.read_stored(0, store.n_tokens), store.dtype)
    chunks, _ = loader.reader.chunk_order(0)
    laid_out = np.concatenate([loader.decoder.chunk_rows[chunk] for chunk in chunks])
    expected = loader.normaliser.apply(stored[torch.from_numpy(laid_out)])  # bit for bit
    batches = list(loader.epoch(0))
    assert len(batches) == -(-rows.size // 16)
    for b, batch in enumerate(batches):  # as multisets: a tiny model repeats some rows
        stretch = expected[16 * b : 16 * (b + 1)]
        assert sorted(map(_key, batch)) == sorted(map(_key, stretch)), b


def _key(row: torch.Tensor) -> bytes:
    return bytes(row.numpy())


def test_memmap_file_is_checksummed_and_rebuilt(store, decoded_dir, capsys):
    loader = ActivationLoader(store, batch_size=32, mode="memmap")
    info = loader.describe()
    path = Path(info["file"])
    assert path.parent == decoded_dir and info["built"]
    assert path.stat().st_size == info["file_bytes"]
    expected = torch.cat(list(loader.epoch(0)))
    loader.close()
    again = ActivationLoader(store, batch_size=32, mode="memmap")
    assert not again.describe()["built"]  # verified, reused
    again.close()
    with open(path, "r+b") as handle:  # flip one bit
        handle.seek(1000)
        byte = handle.read(1)
        handle.seek(1000)
        handle.write(bytes([byte[0] ^ 1]))
    rebuilt = ActivationLoader(store, batch_size=32, mode="memmap")
    assert rebuilt.describe()["built"]
    assert "checksum mismatch" in capsys.readouterr().out
    assert torch.equal(torch.cat(list(rebuilt.epoch(0))), expected)
    assert not list(decoded_dir.glob("*.incomplete"))


def test_memmap_key_follows_layers_and_split(store):
    a = ActivationLoader(store, batch_size=8, mode="memmap", layers=[0, 1])
    b = ActivationLoader(store, batch_size=8, mode="memmap", layers=[1, 2])
    c = ActivationLoader(store, batch_size=8, mode="memmap", layers=[0, 1], split="test")
    paths = {a.describe()["file"], b.describe()["file"], c.describe()["file"]}
    assert len(paths) == 3
    assert all(store.key in Path(p).name for p in paths)


def test_auto_picks_by_budget(store, tmp_path):
    resident = ActivationLoader(store, batch_size=8, resident_max_bytes=1 << 40)
    assert resident.mode == "resident"
    assert "fits the resident budget" in resident.describe()["reason"]
    memmap = ActivationLoader(store, batch_size=8, resident_max_bytes=1)
    assert memmap.mode == "memmap"
    assert "disk budget" in memmap.describe()["reason"]


def test_auto_streams_when_neither_budget_allows(store, monkeypatch):
    monkeypatch.setattr("pipeline.training.readers.budget.disk_budget", lambda path: 0)
    loader = ActivationLoader(store, batch_size=8, resident_max_bytes=1)
    assert loader.mode == "stream"
    assert "disk budget" in loader.describe()["reason"]


def test_resident_budget_comes_from_the_device():
    from pipeline.training.readers.budget import available_ram, resident_budget

    budget = resident_budget(torch.device("cpu"), fraction=0.5)
    assert 0 < budget <= available_ram()


def test_stream_window_defaults_to_a_million_tokens_when_ram_allows(monkeypatch):
    from pipeline.training.readers import budget

    monkeypatch.setattr(budget, "available_ram", lambda: 64 << 30)
    assert budget.stream_window_rows(row_bytes=1000) >= 1 << 20
    monkeypatch.setattr(budget, "available_ram", lambda: 1 << 30)  # 1M rows would not fit
    assert budget.stream_window_rows(row_bytes=1000) < 1 << 20


def test_stream_look_ahead_serves_the_same_next_epoch(store):
    """The next epoch's first window, decoded ahead, equals a fresh decode of it."""
    ahead = ActivationLoader(store, batch_size=40, mode="stream", buffer_chunks=2, seed=6)
    fresh = ActivationLoader(store, batch_size=40, mode="stream", buffer_chunks=2, seed=6)
    list(ahead.epoch(0))
    assert ahead.reader._ahead  # epoch 1's first window was submitted during epoch 0
    for a, b in zip(ahead.epoch(1), fresh.epoch(1), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_gathering_ahead_serves_the_same_batches(store, decoded_dir, mode):
    """Batches gathered in a thread ahead of the step and gathered inline (stream's CPU
    default) are the same batches, resume included."""
    common = {"batch_size": 96, "mode": mode, "buffer_chunks": 2, "seed": 4}
    inline = ActivationLoader(store, gather_ahead=0, **common)
    ahead = ActivationLoader(store, gather_ahead=4, **common)
    assert (inline.reader.gather_ahead, ahead.reader.gather_ahead) == (0, 4)
    for epoch in (0, 1):
        got = list(ahead.epoch(epoch, skip_batches=epoch))
        want = list(inline.epoch(epoch, skip_batches=epoch))
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_concurrent_memmap_loaders_decode_the_split_once(store, decoded_dir):
    """Two loaders (torchrun ranks) wanting the same decoded file: one builds it."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.training.readers import decoded_file

    built = []
    original = decoded_file.build

    def counting_build(*args):
        built.append(1)
        original(*args)

    decoded_file.build = counting_build
    try:
        with ThreadPoolExecutor(2) as pool:
            loaders = list(
                pool.map(
                    lambda r: ActivationLoader(store, batch_size=64, mode="memmap", share=(r, 2)),
                    range(2),
                )
            )
    finally:
        decoded_file.build = original
    assert len(built) == 1
    assert sorted(loader.reader.built for loader in loaders) == [False, True]
    assert not list(decoded_dir.rglob("*.lock"))


def test_stream_strata_must_divide_among_the_ranks(store):
    refusal = r"^run.stream_strata: 3 is not a multiple of the 2 ranks$"
    with pytest.raises(ValueError, match=refusal):
        ActivationLoader(store, batch_size=16, mode="stream", share=(0, 2), stream_strata=3)


@pytest.fixture(scope="module", params=["int8", "float8_e4m3"])
def eight_bit(request, tmp_path_factory) -> ActivationStore:
    manifest = {**TINY, "storage": {**TINY["storage"], "dtype": request.param}}
    root = tmp_path_factory.mktemp("cache8")
    return ActivationStore(harvest.run(HarvestManifest.model_validate(manifest), root).path)


@pytest.mark.parametrize("centre", [False, True])
def test_8bit_every_mode_serves_the_dequantised_values_bit_for_bit(eight_bit, centre):
    """memmap and resident keep packed 8-bit rows and dequantise per batch; stream
    dequantises whole chunks: each equals Normaliser.apply on ``store.read`` (codes x scale)."""
    store = eight_bit
    rows = split_rows(store, "train")
    normaliser = Normaliser.from_store(store, list(range(store.n_layers)), centre)
    expected = normaliser.apply(store.read(0, store.n_tokens)[torch.from_numpy(rows)])

    for mode in MODES:
        loader = ActivationLoader(store, batch_size=100, mode=mode, centre=centre, seed=1)
        served = torch.cat(list(loader.epoch(0)))
        loader.close()
        assert torch.equal(_sorted_rows(served), _sorted_rows(expected)), mode


def test_8bit_modes_hold_packed_rows_and_say_so(eight_bit, store):
    """Resident data and the memmap file are codes plus a float32 scale per token and
    layer (d + 4 bytes), and describe() (loader.json) records the tokens per GiB."""
    layers, d = eight_bit.n_layers, eight_bit.d_model
    resident = ActivationLoader(eight_bit, batch_size=64, mode="resident")
    data = resident.reader.data()
    assert data.dtype == torch.uint8 and data.shape[1:] == (layers, d + 4)
    memmap = ActivationLoader(eight_bit, batch_size=64, mode="memmap")
    assert memmap.reader.data.dtype == np.uint8 and memmap.reader.data.shape[1:] == (layers, d + 4)
    bf16 = ActivationLoader(store, batch_size=64, mode="resident").describe()
    described = memmap.describe()
    assert described["storage_dtype"] == eight_bit.dtype
    assert described["bytes_per_token"] == layers * (d + 4)
    assert described["resident_tokens_per_gib"] == (1 << 30) // (layers * (d + 4))
    assert bf16["bytes_per_token"] == layers * d * 2
    for loader in (resident, memmap):
        loader.close()


def test_8bit_raw_batches_are_the_dequantised_values(eight_bit):
    loader = ActivationLoader(eight_bit, batch_size=64, mode="stream", split="test")
    for rows, raw in loader.raw_batches():
        assert torch.equal(raw, eight_bit.read(0, eight_bit.n_tokens)[torch.from_numpy(rows)])
    loader.close()
