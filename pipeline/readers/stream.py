"""``stream``: whole compressed chunks decoded every epoch into a shuffle window.

Per epoch the chunks are visited in a seeded random order and grouped into windows of at
most ``window_rows`` rows (at least one chunk). A window is decoded by the decoder's thread
pool while the previous one is consumed (and the next epoch's first window while this
epoch's last one is), shuffled with a seeded permutation and cut into batches; the rows a
window leaves over lead the next window's batches. The row stream is therefore the
concatenation of the windows' permutations, which makes resuming exact: skip whole windows
undecoded, then the first rows of the next permutation. For a CPU consumer the window is
normalised float32 already; for a GPU, bf16 batches go from pinned memory and are
normalised on the device.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

import torch

from pipeline.readers.base import ChunkDecoder, Normaliser, Reader, prefetched, seeded_generator

Window = tuple[int, tuple[int, ...], int]  # index in the epoch, chunks, rows


class StreamReader(Reader):
    mode = "stream"

    def __init__(
        self,
        decoder: ChunkDecoder,
        normaliser: Normaliser,
        *,
        batch_size: int,
        seed: int,
        device: torch.device,
        window_rows: int,
        share: tuple[int, int] | None = None,
    ) -> None:
        self.decoder = decoder
        self.normaliser = normaliser
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.window_rows = max(1, window_rows)
        self.share = share
        self.prefetcher = ThreadPoolExecutor(max_workers=1)
        self.gatherers = ThreadPoolExecutor(max_workers=1)
        # batches gathered (and pinned) ahead of a CUDA consumer, so the device never waits
        # for the host; a CPU consumer gathers inline: on 2 shared cores a gathering thread
        # only competes with the step (crosscoder stream/device 0.48 with it, 0.68 without)
        self.gather_ahead = 4 if device.type == "cuda" else 0
        self._ahead: dict[tuple[int, tuple[int, ...]], Future] = {}

    def windows(self, epoch: int) -> list[Window]:
        """This epoch's windows: chunks in a seeded order, grouped up to ``window_rows``."""
        order = torch.randperm(
            self.decoder.store.n_chunks, generator=seeded_generator(self.seed, epoch)
        )
        windows: list[Window] = []
        chunks: list[int] = []
        rows = 0
        for chunk in order.tolist():
            size = len(self.decoder.chunk_rows[chunk])
            if not size:  # a chunk without a row of the split
                continue
            if chunks and rows + size > self.window_rows:
                windows.append((len(windows), tuple(chunks), rows))
                chunks, rows = [], 0
            chunks.append(chunk)
            rows += size
        if chunks:
            windows.append((len(windows), tuple(chunks), rows))
        return windows

    def _decode(self, chunks: tuple[int, ...]) -> torch.Tensor:
        on_cpu = self.device.type == "cpu"
        self.rows_read += self.decoder.n_rows(list(chunks))
        return self.decoder.decode(list(chunks), self.normaliser if on_cpu else None)

    def _submit(self, epoch: int, chunks: tuple[int, ...]) -> Future:
        key = (epoch, chunks)
        if key not in self._ahead:
            self._ahead[key] = self.prefetcher.submit(self._decode, chunks)
        return self._ahead[key]

    def _gather(self, buffer: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """A batch's rows of the window; staged in pinned memory for a CUDA consumer."""
        batch = buffer.index_select(0, rows)
        if self.device.type == "cuda" and batch.device.type == "cpu":  # gpu decode: there
            batch = batch.pin_memory()
        return batch

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            return batch  # normalised while decoding
        on_device = batch.to(self.device, non_blocking=batch.is_pinned())
        return self.normaliser.apply(on_device)

    def epoch(self, epoch: int, skip_batches: int) -> Iterator[torch.Tensor]:
        windows = self.windows(epoch)
        to_skip = skip_batches * self.batch_size
        while windows and to_skip >= windows[0][2]:  # resume: skip whole windows undecoded
            to_skip -= windows.pop(0)[2]
        for key in [k for k in self._ahead if k[0] != epoch]:  # look-ahead of another epoch
            self._ahead.pop(key).cancel()
        if windows:
            self._submit(epoch, windows[0][1])
        pending: torch.Tensor | None = None
        for position, (index, chunks, size) in enumerate(windows):
            if position + 1 < len(windows):
                self._submit(epoch, windows[position + 1][1])
            else:  # overlap the next epoch's first decode with this epoch's last window
                following = self.windows(epoch + 1)
                if following:
                    self._submit(epoch + 1, following[0][1])
            parts = self._ahead.pop((epoch, chunks)).result()
            buffer = torch.cat([pending, parts]) if pending is not None else parts
            n_carried = buffer.shape[0] - size
            shuffled = torch.randperm(size, generator=seeded_generator(self.seed, epoch, index + 1))
            order = torch.cat([torch.arange(n_carried), shuffled[to_skip:] + n_carried])
            order = order.to(buffer.device)  # gpu decode: the window is on the device
            to_skip = 0
            whole = order.shape[0] // self.batch_size * self.batch_size
            gathers = (
                partial(self._gather, buffer, self.mine(order[start : start + self.batch_size]))
                for start in range(0, whole, self.batch_size)
            )
            if self.gather_ahead:  # gathered (and pinned) in threads while the step runs
                gathers = prefetched(self.gatherers, gathers, self.gather_ahead)
            else:
                gathers = (gather() for gather in gathers)
            for batch in gathers:
                yield self._to_device(batch)
            rest = order[whole:]
            pending = buffer.index_select(0, rest) if rest.numel() else None
        if pending is not None:
            rows = self.mine(torch.arange(pending.shape[0], device=pending.device))
            yield self._to_device(self._gather(pending, rows))

    def describe(self) -> dict:
        return {"window_rows": self.window_rows}

    def close(self) -> None:
        for future in self._ahead.values():
            future.cancel()
        self._ahead.clear()
        self.prefetcher.shutdown(wait=False)
        self.gatherers.shutdown(wait=False)
