"""``resident``: the split decoded once onto the device and shuffled there."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch

from pipeline.training.readers.base import (
    ChunkDecoder,
    Normaliser,
    Reader,
    bits_to_float32,
    prefetched,
    seeded_generator,
    storage_numpy,
)


class ResidentReader(Reader):
    """No I/O after the first epoch: the storage dtype on the device, ``randperm`` order.

    An 8-bit store stays 8-bit here (packed codes and scales, ~2x bf16's tokens per GiB),
    dequantised per batch on the device (or in the gather thread on a CPU)."""

    mode = "resident"

    def __init__(
        self,
        decoder: ChunkDecoder,
        normaliser: Normaliser,
        *,
        batch_size: int,
        seed: int,
        device: torch.device,
        share: tuple[int, int] | None = None,
        gather_ahead: int = 4,
    ) -> None:
        self.decoder = decoder
        self.normaliser = normaliser
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.share = share
        self._data: torch.Tensor | None = None
        self.gather_ahead = gather_ahead
        self.pool = ThreadPoolExecutor(max_workers=2)

    def data(self) -> torch.Tensor:
        if self._data is None:
            chunks = list(range(self.decoder.store.n_chunks))
            self._data = self.decoder.decode(chunks, normaliser=None).to(self.device)
        return self._data

    def epoch(self, epoch: int, skip_batches: int) -> Iterator[torch.Tensor]:
        data = self.data()
        order = torch.randperm(data.shape[0], generator=seeded_generator(self.seed, epoch))
        order = order.to(self.device)
        starts = range(skip_batches * self.batch_size, data.shape[0], self.batch_size)

        def batch(start: int) -> torch.Tensor:
            rows = self.mine(order[start : start + self.batch_size])
            self.rows_read += len(rows)
            return self.normaliser.apply_stored(data[rows], self.decoder.store.dtype)

        if self.device.type != "cpu":  # queued on the device: nothing to overlap here
            yield from map(batch, starts)
            return
        # on the CPU, gather and normalise in threads while the step runs, in numpy (one
        # core per thread, no OpenMP team of its own); gathering inline was not consistently
        # faster, within the noise of bench/train.py --inline-ab
        host, dtype = storage_numpy(data), self.decoder.store.dtype

        def host_batch(start: int) -> torch.Tensor:
            rows = self.mine(order[start : start + self.batch_size]).numpy()
            self.rows_read += len(rows)
            return self.normaliser.apply_host_(bits_to_float32(host[rows], dtype))

        tasks = (partial(host_batch, start) for start in starts)
        yield from prefetched(self.pool, tasks, self.gather_ahead)

    def close(self) -> None:
        self._data = None
        self.pool.shutdown(wait=False)
