"""``memmap``: fully shuffled batches gathered from the split's decoded, uncompressed file.

Each batch is a slice of a seeded permutation of all rows, sorted so the gather walks the
file forward (a sorted gather from page cache ran at ~0.5-1x a sequential read, STORAGE.md);
``workers`` threads gather ``gather_ahead`` batches ahead of the consumer. On CUDA a batch
is staged in pinned memory and copied without blocking, then normalised on the device; on
the CPU the gathering thread also widens bf16 bits and normalises in numpy, so the consumer
only waits (gathering inline instead was no faster: ``bench/train.py --inline-ab``).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import torch

from pipeline.training.readers import decoded_file
from pipeline.training.readers.base import (
    ChunkDecoder,
    Normaliser,
    Reader,
    bits_to_float32,
    prefetched,
    seeded_generator,
)


class MemmapReader(Reader):
    mode = "memmap"

    def __init__(
        self,
        decoder: ChunkDecoder,
        normaliser: Normaliser,
        *,
        split: str,
        batch_size: int,
        seed: int,
        device: torch.device,
        workers: int = 2,
        gather_ahead: int = 4,
        share: tuple[int, int] | None = None,
    ) -> None:
        self.file = decoded_file.decoded_file_for(decoder, split)
        self.built = decoded_file.ensure(self.file, decoder, split)
        # a plain ndarray over the mapping: gathers skip np.memmap's subclass wrapping (20%)
        self.data = np.asarray(self.file.open())
        self.dtype = decoder.store.dtype
        self.normaliser = normaliser
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.gather_ahead = gather_ahead
        self.share = share
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers))

    def _gather(self, rows: np.ndarray) -> torch.Tensor:
        """The batch's rows in sorted order (this rank's slice of them under a share)."""
        rows = self.mine(np.sort(rows))
        self.rows_read += len(rows)
        stored = self.data[rows]
        if self.device.type == "cpu":
            return self.normaliser.apply_host_(bits_to_float32(stored, self.dtype))
        if self.dtype == "bfloat16":
            batch = torch.from_numpy(stored.view(np.int16)).view(torch.bfloat16)
        else:
            batch = torch.from_numpy(stored)
        return batch.pin_memory() if self.device.type == "cuda" else batch

    def epoch(self, epoch: int, skip_batches: int) -> Iterator[torch.Tensor]:
        order = torch.randperm(self.file.shape[0], generator=seeded_generator(self.seed, epoch))
        order = order.numpy()
        starts = range(skip_batches * self.batch_size, order.size, self.batch_size)
        tasks = (partial(self._gather, order[start : start + self.batch_size]) for start in starts)
        for batch in prefetched(self.pool, tasks, self.gather_ahead):
            if self.device.type == "cpu":
                yield batch
            else:
                on_device = batch.to(self.device, non_blocking=self.device.type == "cuda")
                yield self.normaliser.apply_stored(on_device, self.dtype)

    def describe(self) -> dict:
        return {"file": str(self.file.path), "file_bytes": self.file.n_bytes, "built": self.built}

    def close(self) -> None:
        self.pool.shutdown(wait=False)
