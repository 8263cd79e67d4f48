"""Shuffled, normalised token batches ``[batch, n_layers, d_model]`` from a store.

Two modes with one contract (every selected token exactly once per epoch, order fixed by
``seed`` and the epoch number):

* ``resident``: the split is decoded once (whole chunks, in parallel) into the device
  in the storage dtype and shuffled there with ``randperm``: no I/O after the first epoch.
* ``stream``: per epoch, chunks are visited in a seeded order; ``buffer_chunks`` chunks
  at a time are decoded by background threads (whole compressed chunks, never random
  rows: those decompress every chunk per batch) into one buffer while the previous one is
  consumed; batches are gathered from it in a seeded order. For a CPU consumer the
  buffer is normalised float32 already; for a GPU, bf16 batches go from pinned memory
  and are normalised on the device.

``auto`` picks ``resident`` when the split fits in ``resident_max_bytes``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.store import ActivationStore
from pipeline.store_format import TORCH_STORAGE


@dataclass(frozen=True)
class Normaliser:
    """x_norm = (x - centre * mean) * scale, per layer; scale makes E||x_l|| = sqrt(d)."""

    mean: torch.Tensor  # [L, d]
    scale: torch.Tensor  # [L]
    centre: bool

    @classmethod
    def from_store(cls, store: ActivationStore, layers: list[int], centre: bool) -> Normaliser:
        stats = store.stats
        norm = stats["centred_rms_norm" if centre else "mean_norm"][layers]
        scale = store.d_model**0.5 / norm.clamp_min(1e-6)
        return cls(stats["mean"][layers].float(), scale.float(), centre)

    def to(self, device: torch.device) -> Normaliser:
        return Normaliser(self.mean.to(device), self.scale.to(device), self.centre)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """One float32 allocation, then in place: on CPU the fresh buffers dominated."""
        out = x.to(torch.float32, copy=True)
        if self.centre:
            out.sub_(self.mean)
        return out.mul_(self.scale[:, None])

    def apply_layer_(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """``apply`` in place on float32 rows ``[n, d]`` of one (selected) layer."""
        if self.centre:
            x.sub_(self.mean[layer])
        return x.mul_(self.scale[layer])

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        x = x / self.scale[:, None]
        return x + self.mean if self.centre else x


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
    store: ActivationStore, split: str, *, validation_fraction: float = 0.0
) -> np.ndarray:
    """Row indices of non-special tokens whose document is in ``split``.

    ``split`` is train, validation, test or all. ``validation`` is carved from the store's
    train documents (``validation_fraction`` of them, by a hash of doc_id); ``train`` then
    excludes them whenever the fraction is > 0. The test split is never touched."""
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
    return np.flatnonzero(keep)


class ActivationLoader:
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
        buffer_chunks: int = 4,
        workers: int = 2,
        resident_max_bytes: int = 8 << 30,
        validation_fraction: float = 0.0,
    ) -> None:
        self.store = store
        self.batch_size = batch_size
        self.layers = list(range(store.n_layers)) if layers is None else list(layers)
        self.seed = seed
        self.device = torch.device(device)
        self.rows = split_rows(store, split, validation_fraction=validation_fraction)
        if self.rows.size == 0:
            raise ValueError(f"split '{split}' of store {store.key} has no tokens")
        self.normaliser = Normaliser.from_store(store, self.layers, centre).to(self.device)
        self.buffer_chunks = buffer_chunks
        self._prefetch = ThreadPoolExecutor(max_workers=1)
        self._decoders = ThreadPoolExecutor(max_workers=workers)
        bytes_needed = self.rows.size * len(self.layers) * store.d_model * 2
        if mode == "auto":
            mode = "resident" if bytes_needed <= resident_max_bytes else "stream"
        if mode not in ("resident", "stream"):
            raise ValueError(f"loader mode must be auto, resident or stream, not {mode!r}")
        self.mode = mode
        self._resident: torch.Tensor | None = None
        chunk_of_row = self.rows // store.chunk_tokens
        self._chunk_rows = [self.rows[chunk_of_row == c] for c in range(store.n_chunks)]

    @property
    def n_tokens(self) -> int:
        return int(self.rows.size)

    def steps_per_epoch(self) -> int:
        return -(-self.n_tokens // self.batch_size)

    def _decode_chunks(self, chunks: list[int], normalise: bool) -> torch.Tensor:
        """Selected rows of ``chunks``, ``[rows, L, d]`` on the CPU, decoded layer by layer
        (in parallel) straight into one buffer: the storage dtype, or normalised float32
        when ``normalise`` (a CPU consumer then only gathers rows; fresh large buffers and
        extra copies, not decompression, dominated the CPU read path)."""
        sizes = [len(self._chunk_rows[chunk]) for chunk in chunks]
        dtype = torch.float32 if normalise else TORCH_STORAGE[self.store.dtype]
        out = torch.empty(sum(sizes), len(self.layers), self.store.d_model, dtype=dtype)
        offsets = np.cumsum([0, *sizes])
        normaliser = self.normaliser if normalise else None  # only for a CPU consumer

        def fill(task: tuple[int, int]) -> None:
            index, j = task
            chunk = chunks[index]
            start, stop = self.store.chunk_rows(chunk)
            values = self.store.read_layer(self.layers[j], start, stop)
            rows = self._chunk_rows[chunk] - start
            if rows.size and rows[-1] - rows[0] + 1 == rows.size:
                values = values[rows[0] : rows[-1] + 1]
            else:
                values = values[torch.from_numpy(rows)]
            target = out[offsets[index] : offsets[index + 1], j]
            target.copy_(values)
            if normaliser is not None:
                normaliser.apply_layer_(target, j)

        tasks = [(i, j) for i in range(len(chunks)) for j in range(len(self.layers))]
        list(self._decoders.map(fill, tasks))
        return out

    def _load_resident(self) -> torch.Tensor:
        if self._resident is None:
            data = self._decode_chunks(list(range(self.store.n_chunks)), normalise=False)
            self._resident = data.to(self.device)
        return self._resident

    def _generator(self, epoch: int, salt: int = 0) -> torch.Generator:
        generator = torch.Generator()
        generator.manual_seed((self.seed * 1_000_003 + epoch) * 1_000_003 + salt)
        return generator

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[torch.Tensor]:
        """Batches of one epoch, normalised float32 on ``self.device``."""
        if self.mode == "resident":
            yield from self._resident_epoch(epoch, skip_batches)
        else:
            yield from self._stream_epoch(epoch, skip_batches)

    def _resident_epoch(self, epoch: int, skip_batches: int) -> Iterator[torch.Tensor]:
        data = self._load_resident()
        order = torch.randperm(data.shape[0], generator=self._generator(epoch)).to(self.device)
        for start in range(skip_batches * self.batch_size, data.shape[0], self.batch_size):
            yield self.normaliser.apply(data[order[start : start + self.batch_size]])

    def _stream_epoch(self, epoch: int, skip_batches: int) -> Iterator[torch.Tensor]:
        chunk_order = torch.randperm(self.store.n_chunks, generator=self._generator(epoch))
        groups = [
            (index, group, sum(len(self._chunk_rows[c]) for c in group))
            for index, group in enumerate(
                chunk_order[i : i + self.buffer_chunks].tolist()
                for i in range(0, len(chunk_order), self.buffer_chunks)
            )
        ]
        groups = [entry for entry in groups if entry[2]]  # chunks with no row of the split
        to_skip = skip_batches * self.batch_size
        while groups and to_skip >= groups[0][2]:  # resume: skip whole groups undecoded
            to_skip -= groups.pop(0)[2]
        pending: list[torch.Tensor] = []
        prefetch: Future | None = None
        on_cpu = self.device.type == "cpu"
        pin = self.device.type == "cuda"

        def ready(batch: torch.Tensor) -> torch.Tensor:
            if on_cpu:
                return batch  # already normalised while decoding
            if pin:
                batch = batch.pin_memory()
            return self.normaliser.apply(batch.to(self.device, non_blocking=pin))

        for position, (index, group, size) in enumerate(groups):
            if prefetch is not None:
                parts = prefetch.result()
            else:
                parts = self._decode_chunks(group, on_cpu)
            prefetch = (
                self._prefetch.submit(self._decode_chunks, groups[position + 1][1], on_cpu)
                if position + 1 < len(groups)
                else None
            )
            # Rows carried from the last group first, then this group's in a seeded order;
            # batches are gathered from that order, never a second shuffled copy.
            buffer = torch.cat([*pending, parts]) if pending else parts
            n_carried = buffer.shape[0] - size
            shuffled = torch.randperm(size, generator=self._generator(epoch, index + 1))
            order = torch.cat([torch.arange(n_carried), shuffled[to_skip:] + n_carried])
            to_skip = 0
            whole = order.shape[0] // self.batch_size * self.batch_size
            for start in range(0, whole, self.batch_size):
                yield ready(buffer.index_select(0, order[start : start + self.batch_size]))
            pending = [buffer.index_select(0, order[whole:])]
        if pending and pending[0].shape[0]:
            yield ready(pending[0])

    def raw_batches(self) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """``(row indices, raw-unit float32 [rows, L, d])`` of the split in store order."""
        for chunk in range(self.store.n_chunks):
            if len(self._chunk_rows[chunk]):
                raw = self._decode_chunks([chunk], normalise=False)
                yield self._chunk_rows[chunk], raw.float().to(self.device)

    def close(self) -> None:
        self._prefetch.shutdown(wait=False)
        self._decoders.shutdown(wait=False)
