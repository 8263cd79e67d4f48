"""Shuffled, normalised token batches ``[batch, n_layers, d_model]`` from a store.

Two modes with one contract (every selected token exactly once per epoch, order fixed by
``seed`` and the epoch number):

* ``resident``: the split is decoded once (whole chunks, in parallel) into the device
  in the storage dtype and shuffled there with ``randperm``: no I/O after the first epoch.
* ``stream``: per epoch, chunks are visited in a seeded order; ``buffer_chunks`` chunks
  at a time are decoded by background threads (whole compressed chunks, never random
  rows: those decompress every chunk per batch) into a shuffle buffer, and batches go
  to the device from pinned memory.

``auto`` picks ``resident`` when the split fits in ``resident_max_bytes``.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.store import ActivationStore


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
        x = x.float()
        if self.centre:
            x = x - self.mean
        return x * self.scale[:, None]

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        x = x / self.scale[:, None]
        return x + self.mean if self.centre else x


def split_rows(store: ActivationStore, split: str) -> np.ndarray:
    """Row indices of non-special tokens whose document is in ``split`` (train/test/all)."""
    tokens = store.tokens(columns=["doc_id", "is_special"])
    doc_ids = tokens["doc_id"].to_numpy()
    keep = ~tokens["is_special"].to_numpy(zero_copy_only=False)
    if split != "all":
        documents = store.documents()
        in_split = np.zeros(int(documents["doc_id"].to_numpy().max()) + 2, dtype=bool)
        selected = documents["doc_id"].to_numpy()[
            np.asarray(documents["split"].to_pylist()) == split
        ]
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
    ) -> None:
        self.store = store
        self.batch_size = batch_size
        self.layers = list(range(store.n_layers)) if layers is None else list(layers)
        self.seed = seed
        self.device = torch.device(device)
        self.rows = split_rows(store, split)
        if self.rows.size == 0:
            raise ValueError(f"split '{split}' of store {store.key} has no tokens")
        self.normaliser = Normaliser.from_store(store, self.layers, centre).to(self.device)
        self.buffer_chunks = buffer_chunks
        self._pool = ThreadPoolExecutor(max_workers=workers)
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

    def _decode_chunk(self, chunk: int) -> torch.Tensor:
        """Selected rows of one chunk in the storage dtype, ``[rows, L, d]`` (CPU)."""
        start, stop = self.store.chunk_rows(chunk)
        stored = self.store.read_stored(start, stop, self.layers)
        selected = stored[self._chunk_rows[chunk] - start]
        if self.store.dtype == "bfloat16":
            return torch.from_numpy(selected.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(selected)

    def _load_resident(self) -> torch.Tensor:
        if self._resident is None:
            parts = list(self._pool.map(self._decode_chunk, range(self.store.n_chunks)))
            self._resident = torch.cat(parts).to(self.device)
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
            chunk_order[i : i + self.buffer_chunks].tolist()
            for i in range(0, len(chunk_order), self.buffer_chunks)
        ]
        to_skip = skip_batches * self.batch_size
        pending: list[torch.Tensor] = []
        prefetch: Future | None = None
        pin = self.device.type == "cuda"

        def load(group: list[int]) -> list[torch.Tensor]:
            return [self._decode_chunk(c) for c in group]

        for index, group in enumerate(groups):
            size = sum(len(self._chunk_rows[c]) for c in group)
            if to_skip >= size:  # resume: skip whole groups without decoding them
                to_skip -= size
                continue
            parts = prefetch.result() if prefetch is not None else load(group)
            prefetch = (
                self._pool.submit(load, groups[index + 1]) if index + 1 < len(groups) else None
            )
            buffer = torch.cat(parts)
            buffer = buffer[
                torch.randperm(buffer.shape[0], generator=self._generator(epoch, index + 1))
            ]
            buffer = buffer[to_skip:]
            to_skip = 0
            pending.append(buffer)
            carried = torch.cat(pending)
            whole = carried.shape[0] // self.batch_size * self.batch_size
            for start in range(0, whole, self.batch_size):
                batch = carried[start : start + self.batch_size]
                if pin:
                    batch = batch.pin_memory()
                yield self.normaliser.apply(batch.to(self.device, non_blocking=pin))
            pending = [carried[whole:]]
        rest = torch.cat(pending) if pending else None
        if rest is not None and rest.shape[0]:
            yield self.normaliser.apply(rest.to(self.device))

    def raw_batches(self) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """``(row indices, raw-unit float32 [rows, L, d])`` of the split in store order."""
        for chunk in range(self.store.n_chunks):
            if len(self._chunk_rows[chunk]):
                yield self._chunk_rows[chunk], self._decode_chunk(chunk).float().to(self.device)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
