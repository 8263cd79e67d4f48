"""Shuffled, normalised token batches ``[batch, n_layers, d_model]`` from a store.

Three modes with one contract (every selected token exactly once per epoch, order fixed by
``seed`` and the epoch number, exact resume with ``skip_batches``), each a reader in
pipeline/training/readers/:

* ``resident``: the split decoded once onto the device, shuffled there with ``randperm``;
* ``memmap``: the split decoded once into an uncompressed file beside the caches, served
  fully shuffled by sorted random-row gathers in background threads;
* ``stream``: chunks decoded every epoch, in a seeded order, into a shuffle window sized in
  bytes (by default a share of available RAM, at least 1M tokens when that fits).

``auto`` picks resident when the split fits the resident budget (a share of the device's
free memory, or ``resident_max_bytes``), else memmap when the disk allows, else stream;
``describe()`` says which and why (stages/train.py records it).

``decode: gpu`` decompresses a zstd-gpu store's chunks with nvCOMP on the device
(pipeline/training/readers/gpu_decode.py). ``share = (rank, world)`` (torchrun) yields only that
rank's rows of each global batch, and gathers only those (pipeline/training/ddp.py); in stream mode
it decodes only its strata's segment of each window (``stream_strata``, default the world
size: the batches depend on it, never on the number of ranks).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from pipeline.store.format import row_bytes, to_float32
from pipeline.store.outliers import excluded_rows, outlier_scan
from pipeline.store.reader import ActivationStore
from pipeline.training.readers import (
    ChunkDecoder,
    MemmapReader,
    Normaliser,
    Reader,
    ResidentReader,
    StreamReader,
    choose_mode,
    decoded_file,
    gpu_decode,
)
from pipeline.training.readers.budget import resident_budget, stream_window_rows

__all__ = ["ActivationLoader", "Normaliser", "split_rows"]


def validation_documents(doc_ids: np.ndarray, fraction: float) -> np.ndarray:
    """Bool per entry of ``doc_ids`` (a split's documents): held out for validation.

    The ``ceil(fraction * n)`` documents with the smallest fixed integer hash of their id
    (not the store's order, not a seed), at least one and never all when ``fraction > 0``,
    so every run of a cache holds out the same documents, even in a tiny store."""
    if not 0 <= fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), not {fraction}")
    held = np.zeros(doc_ids.size, dtype=bool)
    n_held = min(doc_ids.size - 1, math.ceil(fraction * doc_ids.size)) if fraction > 0 else 0
    if n_held <= 0:
        return held
    mixed = (doc_ids.astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    mixed ^= mixed >> np.uint64(31)
    mixed *= np.uint64(0xBF58476D1CE4E5B9)
    mixed ^= mixed >> np.uint64(29)
    held[np.argsort(mixed, kind="stable")[:n_held]] = True
    return held


def split_rows(
    store: ActivationStore,
    split: str,
    *,
    validation_fraction: float = 0.0,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """Row indices of non-special tokens whose document is in ``split``.

    ``split`` is train, validation, test or all. ``validation`` is carved from the store's
    train documents (``validation_fraction`` of them, by a hash of doc_id); ``train`` then
    excludes them whenever the fraction is > 0. The test split is never touched. Rows in
    ``exclude`` (an outlier scan's) are dropped from every split."""
    if split not in ("train", "validation", "test", "all"):
        raise ValueError(f"split must be train, validation, test or all, not {split!r}")
    tokens = store.tokens(columns=["doc_id", "is_special"])
    doc_ids = tokens["doc_id"].to_numpy()
    keep = ~tokens["is_special"].to_numpy(zero_copy_only=False)
    if split != "all":
        documents = store.documents()
        ids = documents["doc_id"].to_numpy()
        stored_split = np.asarray(documents["split"].to_pylist())
        selected = ids[stored_split == ("test" if split == "test" else "train")]
        if split != "test" and validation_fraction > 0:
            held = validation_documents(selected, validation_fraction)
            selected = selected[held] if split == "validation" else selected[~held]
        elif split == "validation":
            selected = selected[:0]
        in_split = np.zeros(int(ids.max()) + 2, dtype=bool)
        in_split[selected] = True
        keep &= in_split[doc_ids]  # doc_id -1 (special) indexes the spare last slot: False
    if exclude is not None:
        keep[exclude] = False
    return np.flatnonzero(keep)


class ActivationLoader:
    """The train and evaluate stages' batch source; the mode's work is its reader's."""

    def __init__(
        self,
        store: ActivationStore,
        *,
        batch_size: int,
        layers: list[int] | None = None,
        split: str = "train",
        seed: int = 0,
        device: str | torch.device = "cpu",
        centre: bool = False,
        mode: str = "auto",
        workers: int = 2,
        buffer_chunks: int | None = None,
        resident_max_bytes: int | None = None,
        window_bytes: int | None = None,
        verbose: bool = False,
        validation_fraction: float = 0.0,
        outlier_ratio: float | None = None,
        decode: str = "cpu",
        share: tuple[int, int] | None = None,
        stream_strata: int | None = None,
        gather_ahead: int | None = None,
    ) -> None:
        self.store = store
        self.batch_size = batch_size
        self.layers = list(range(store.n_layers)) if layers is None else list(layers)
        self.seed = seed
        self.split = split
        self.device = torch.device(device)
        self.outliers = outlier_scan(store, outlier_ratio)
        self.rows = split_rows(
            store,
            split,
            validation_fraction=validation_fraction,
            exclude=excluded_rows(self.outliers),
        )
        if self.rows.size == 0:
            raise ValueError(f"split '{split}' of store {store.key} has no tokens")
        self.normaliser = Normaliser.from_store(store, self.layers, centre, self.outliers)
        self.normaliser = self.normaliser.to(self.device)
        self.decode = decode
        self.share = share
        self.decoder = self._decoder(decode, workers)
        # as the readers hold a token (8-bit: codes + scale, ~2x bf16's tokens per GiB)
        self.row_bytes = len(self.layers) * row_bytes(store.d_model, store.dtype)
        if resident_max_bytes is None and mode == "auto":
            resident_max_bytes = resident_budget(self.device)
        file = decoded_file.decoded_file_for(self.decoder, split)
        self.choice = choose_mode(
            mode,
            self.n_tokens * self.row_bytes,
            resident_max_bytes or 0,
            file.path,
            file.path.is_file(),
        )
        self.mode = self.choice.mode
        if verbose:
            print(f"loader: {self.mode} ({self.choice.reason})")
            if self.outliers is not None and self.outliers.rows.size:
                print(f"loader: excluded {self.outliers.summary()}")
        self.stream_strata = stream_strata
        self.gather_ahead = gather_ahead
        self.reader = self._reader(workers, window_bytes, buffer_chunks)

    def _decoder(self, decode: str, workers: int) -> ChunkDecoder:
        """``cpu``: zarr on the host; ``gpu``: nvCOMP on the device (zstd-gpu stores only;
        checked here, before any work, with a one-line error)."""
        if decode == "cpu":
            return ChunkDecoder(self.store, self.layers, self.rows, workers)
        if decode != "gpu":
            raise ValueError(f"decode must be cpu or gpu, not {decode!r}")
        gpu_decode.require_gpu_layout(self.store)
        frames = gpu_decode.frame_decoder_for(self.device)
        return gpu_decode.GpuChunkDecoder(
            self.store, self.layers, self.rows, workers, device=self.device, frames=frames
        )

    def _reader(self, workers: int, window_bytes: int | None, buffer_chunks: int | None) -> Reader:
        common = {
            "batch_size": self.batch_size,
            "seed": self.seed,
            "device": self.device,
            "share": self.share,
        }
        if self.gather_ahead is not None:  # else each reader's own default
            common["gather_ahead"] = self.gather_ahead
        if self.mode == "resident":
            return ResidentReader(self.decoder, self.normaliser, **common)
        if self.mode == "memmap":
            return MemmapReader(
                self.decoder, self.normaliser, split=self.split, workers=workers, **common
            )
        # a CPU consumer holds the window as normalised float32 (4 bytes a value)
        float_row = len(self.layers) * self.store.d_model * 4
        buffer_row = float_row if self.device.type == "cpu" else self.row_bytes
        if window_bytes is None and self.decode == "gpu":  # windows live on the device
            window_bytes = resident_budget(self.device) // 4
        window = stream_window_rows(buffer_row, window_bytes)
        if buffer_chunks is not None:  # a window of that many whole chunks
            window = buffer_chunks * self.store.chunk_tokens
        return StreamReader(
            self.decoder,
            self.normaliser,
            window_rows=window,
            strata=self.stream_strata,
            **common,
        )

    @property
    def n_tokens(self) -> int:
        return int(self.rows.size)

    def steps_per_epoch(self) -> int:
        return -(-self.n_tokens // self.batch_size)

    def describe(self) -> dict:
        """The mode, why it was chosen, and the reader's figures: for the run's metadata."""
        excluded = {}
        if self.outliers is not None:
            excluded = {
                "outlier_ratio": self.outliers.ratio,
                "outlier_tokens_excluded": int(self.outliers.rows.size),
            }
        return {
            "mode": self.mode,
            "reason": self.choice.reason,
            "decode": self.decode,
            "gather_ahead": self.reader.gather_ahead,
            "storage_dtype": self.store.dtype,
            "bytes_per_token": self.row_bytes,
            "resident_tokens_per_gib": (1 << 30) // self.row_bytes,
            **excluded,
            **self.reader.describe(),
        }

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[torch.Tensor]:
        """Batches of one epoch, normalised float32 on ``self.device``."""
        return self.reader.epoch(epoch, skip_batches)

    def raw_batches(self) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """``(row indices, raw-unit float32 [rows, L, d])`` of the split in store order."""
        for chunk in range(self.store.n_chunks):
            if len(self.decoder.chunk_rows[chunk]):
                raw = self.decoder.decode([chunk], normaliser=None)
                raw = to_float32(raw, self.store.dtype)
                yield self.decoder.chunk_rows[chunk], raw.to(self.device)

    def close(self) -> None:
        self.reader.close()
        self.decoder.close()
