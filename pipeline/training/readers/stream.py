"""``stream``: whole compressed chunks decoded every epoch into a shuffle window.

An epoch's rows are laid out chunk by chunk, the chunks in a seeded random order, and cut
into windows of ``window_rows`` rows (a whole number of batches; the last window takes the
rest). A window is split into ``strata`` contiguous segments, one per stratum, sized to
the stratum's share of every batch; each segment is shuffled with its own seeded
permutation, and global batch ``b`` is stratum 0's ``b``-th piece, then stratum 1's, and
so on. A window is decoded while the previous one is consumed (and the next epoch's first
window while this epoch's last one is).

Under torchrun (``share = (rank, world)``, ``strata`` a multiple of ``world``) a rank owns a
contiguous run of strata, so it decodes only its segment of each window (plus the chunk a
segment boundary cuts), and yields exactly its ``rank_rows`` slice of every global batch:
the global batches depend on ``strata``, never on the world size, and equal one process's
with the same ``strata``. Resuming skips whole windows undecoded. For a CPU consumer the
segment is normalised float32 already; for a GPU, bf16 batches go from pinned memory and
are normalised on the device.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from pipeline.training.readers.base import (
    ChunkDecoder,
    Normaliser,
    Reader,
    prefetched,
    rank_rows,
    seeded_generator,
)


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` of an epoch's chunk-ordered row list: one rank's part of a
    window of ``window_rows`` rows (its strata's segments, which are contiguous)."""

    epoch: int
    window: int
    window_rows: int
    start: int
    stop: int


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
        strata: int | None = None,
        gather_ahead: int | None = None,
    ) -> None:
        self.decoder = decoder
        self.normaliser = normaliser
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.share = share
        world = 1 if share is None else share[1]
        self.strata = world if strata is None else strata
        if self.strata < 1 or self.strata % world:
            raise ValueError(
                f"run.stream_strata: {self.strata} is not a multiple of the {world} ranks"
            )
        if batch_size < self.strata:
            raise ValueError(
                f"run.stream_strata: {self.strata} strata need a batch of at least that many "
                f"rows (training.batch_size is {batch_size})"
            )
        # whole batches per window, at least one
        self.window_rows = max(1, window_rows // batch_size) * batch_size
        self.prefetcher = ThreadPoolExecutor(max_workers=1)
        self.gatherers = ThreadPoolExecutor(max_workers=1)
        # batches gathered (and pinned) ahead of a CUDA consumer, so the device never waits
        # for the host; a CPU consumer gathers inline: on 2 shared cores a gathering thread
        # beside the window's decode only competes with the step (crosscoder stream/device
        # 0.48 with it, 0.68 without)
        if gather_ahead is None:
            gather_ahead = 4 if device.type == "cuda" else 0
        self.gather_ahead = gather_ahead
        self._ahead: dict[Segment, Future] = {}

    # the plan: pure index arithmetic, the same on every rank ----------------------------

    def chunk_order(self, epoch: int) -> tuple[list[int], np.ndarray]:
        """This epoch's chunks (those holding rows of the split) in a seeded order, and
        where each one's rows start in the chunk-ordered row list (one entry more)."""
        order = torch.randperm(
            self.decoder.store.n_chunks, generator=seeded_generator(self.seed, epoch)
        ).tolist()
        chunks = [chunk for chunk in order if len(self.decoder.chunk_rows[chunk])]
        starts = np.cumsum([0] + [len(self.decoder.chunk_rows[chunk]) for chunk in chunks])
        return chunks, starts

    def stratum_pieces(self, rows: int, stratum: int) -> list[int]:
        """A stratum's rows in each batch of a window of ``rows`` rows: its ``rank_rows``
        cut of every full batch, then of the short last batch (the last window's)."""
        full, rest = divmod(rows, self.batch_size)
        pieces = [_length(rank_rows(self.batch_size, stratum, self.strata))] * full
        return pieces + ([_length(rank_rows(rest, stratum, self.strata))] if rest else [])

    def stratum_offsets(self, rows: int) -> np.ndarray:
        """Where each stratum's segment starts in a window of ``rows`` rows (one entry more)."""
        sizes = [sum(self.stratum_pieces(rows, j)) for j in range(self.strata)]
        return np.cumsum([0, *sizes])

    def my_strata(self) -> range:
        if self.share is None:
            return range(self.strata)
        rank, world = self.share
        per_rank = self.strata // world
        return range(rank * per_rank, (rank + 1) * per_rank)

    def segments(self, epoch: int, n_rows: int) -> list[Segment]:
        """This rank's segment of each of the epoch's windows."""
        mine = self.my_strata()
        out = []
        for window, start in enumerate(range(0, n_rows, self.window_rows)):
            size = min(self.window_rows, n_rows - start)
            offsets = self.stratum_offsets(size)
            mine_start, mine_stop = start + offsets[mine.start], start + offsets[mine.stop]
            out.append(Segment(epoch, window, size, int(mine_start), int(mine_stop)))
        return out

    # decoding ----------------------------------------------------------------------------

    def segment_chunks(self, segment: Segment) -> tuple[list[int], int]:
        """The chunks a segment overlaps, in order, and where it starts in the first one."""
        chunks, starts = self.chunk_order(segment.epoch)
        first = int(np.searchsorted(starts, segment.start, side="right")) - 1
        last = int(np.searchsorted(starts, segment.stop, side="left"))
        return chunks[first:last], segment.start - int(starts[first])

    def _decode(self, segment: Segment) -> torch.Tensor:
        """The segment's rows, decoded from the chunks it overlaps (and nothing else)."""
        wanted, offset = self.segment_chunks(segment)
        self.rows_read += self.decoder.n_rows(wanted)
        on_cpu = self.device.type == "cpu"
        decoded = self.decoder.decode(wanted, self.normaliser if on_cpu else None)
        return decoded[offset : offset + segment.stop - segment.start]

    def _submit(self, segment: Segment) -> Future:
        if segment not in self._ahead:
            self._ahead[segment] = self.prefetcher.submit(self._decode, segment)
        return self._ahead[segment]

    def _gather(self, buffer: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """A batch's rows of the segment; staged in pinned memory for a CUDA consumer."""
        batch = buffer.index_select(0, rows)
        if self.device.type == "cuda" and batch.device.type == "cpu":  # gpu decode: there
            batch = batch.pin_memory()
        return batch

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            return batch  # normalised while decoding
        on_device = batch.to(self.device, non_blocking=batch.is_pinned())
        return self.normaliser.apply_stored(on_device, self.decoder.store.dtype)

    # batches -----------------------------------------------------------------------------

    def _batch_rows(self, segment: Segment, device: torch.device) -> list[torch.Tensor]:
        """Row indices into the segment's buffer, one tensor per batch of the window."""
        offsets = self.stratum_offsets(segment.window_rows)
        mine = self.my_strata()
        pieces = []  # per stratum: its permuted rows, cut into its piece of each batch
        for j in mine:
            cuts = self.stratum_pieces(segment.window_rows, j)
            salt = segment.window * self.strata + j + 1
            generator = seeded_generator(self.seed, segment.epoch, salt)
            order = torch.randperm(sum(cuts), generator=generator)
            order += int(offsets[j] - offsets[mine.start])
            pieces.append(torch.split(order, cuts))
        return [torch.cat(parts).to(device) for parts in zip(*pieces, strict=True)]

    def epoch(self, epoch: int, skip_batches: int) -> Iterator[torch.Tensor]:
        n_rows = self.decoder.n_rows(list(range(self.decoder.store.n_chunks)))
        segments = self.segments(epoch, n_rows)
        per_window = self.window_rows // self.batch_size
        skipped_windows, skip_in_window = divmod(skip_batches, per_window)
        segments = segments[skipped_windows:]  # resume: whole windows stay undecoded
        for segment in [s for s in self._ahead if s.epoch != epoch]:  # another epoch's
            self._ahead.pop(segment).cancel()
        if segments:
            self._submit(segments[0])
        for position, segment in enumerate(segments):
            if position + 1 < len(segments):
                self._submit(segments[position + 1])
            else:  # overlap the next epoch's first decode with this epoch's last window
                following = self.segments(epoch + 1, n_rows)
                if following:
                    self._submit(following[0])
            buffer = self._ahead.pop(segment).result()
            rows = self._batch_rows(segment, buffer.device)[skip_in_window:]
            skip_in_window = 0
            gathers = (partial(self._gather, buffer, index) for index in rows)
            for batch in prefetched(self.gatherers, gathers, self.gather_ahead):
                yield self._to_device(batch)

    def describe(self) -> dict:
        return {"window_rows": self.window_rows, "strata": self.strata}

    def close(self) -> None:
        for future in self._ahead.values():
            future.cancel()
        self._ahead.clear()
        self.prefetcher.shutdown(wait=False)
        self.gatherers.shutdown(wait=False)


def _length(rows: slice) -> int:
    return rows.stop - rows.start
