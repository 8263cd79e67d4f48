"""What every reader shares: the normaliser, the seeded order, whole-chunk decoding."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.store.format import (
    TORCH_STORAGE,
    dequantise,
    is_quantised,
    packed_float32,
    row_bytes,
    to_float32,
)
from pipeline.store.outliers import OutlierScan
from pipeline.store.reader import ActivationStore


@dataclass(frozen=True)
class Normaliser:
    """x_norm = (x - centre * mean) * scale, per layer; scale makes E||x_l|| = sqrt(d)."""

    mean: torch.Tensor  # [L, d]
    scale: torch.Tensor  # [L]
    centre: bool

    @classmethod
    def from_store(
        cls,
        store: ActivationStore,
        layers: list[int],
        centre: bool,
        outliers: OutlierScan | None = None,
    ) -> Normaliser:
        """From the store's statistics, or from those of the tokens an outlier scan keeps."""
        stats = store.stats if outliers is None else outliers.stats
        norm = stats["centred_rms_norm" if centre else "mean_norm"][layers]
        scale = store.d_model**0.5 / norm.clamp_min(1e-6)
        return cls(stats["mean"][layers].float(), scale.float(), centre)

    def to(self, device: torch.device) -> Normaliser:
        return Normaliser(self.mean.to(device), self.scale.to(device), self.centre)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """One float32 allocation, then in place: on CPU the fresh buffers dominated."""
        out = x.to(torch.float32, copy=True)
        return self.apply_(out)

    def apply_stored(self, x: torch.Tensor, dtype: str) -> torch.Tensor:
        """``apply`` on the readers' storage representation of a store of ``dtype`` (8-bit:
        packed codes and scales, dequantised here, on ``x``'s device)."""
        return self.apply_(to_float32(x, dtype))

    def apply_(self, x: torch.Tensor) -> torch.Tensor:
        """``apply`` in place on float32 ``[n, L, d]``."""
        if self.centre:
            x.sub_(self.mean)
        return x.mul_(self.scale[:, None])

    def apply_host_(self, x: torch.Tensor) -> torch.Tensor:
        """``apply_`` in numpy, for a loader thread on the CPU: numpy stays on that thread,
        where torch would start an OpenMP team of its own beside the training step's."""
        values = x.numpy()
        if self.centre:
            np.subtract(values, self.mean.numpy(), out=values)
        np.multiply(values, self.scale.numpy()[:, None], out=values)
        return x

    def apply_layer_(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """``apply`` in place on float32 rows ``[n, d]`` of one (selected) layer."""
        if self.centre:
            x.sub_(self.mean[layer])
        return x.mul_(self.scale[layer])

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        x = x / self.scale[:, None]
        return x + self.mean if self.centre else x


def seeded_generator(seed: int, epoch: int, salt: int = 0) -> torch.Generator:
    """The one source of order: a function of the run's seed, the epoch and a salt."""
    generator = torch.Generator()
    generator.manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + salt)
    return generator


def bits_to_float32(stored: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored values (bf16 as uint16 bits, 8-bit as packed rows) -> a fresh float32 tensor,
    one pass in numpy."""
    if is_quantised(dtype):
        return torch.from_numpy(packed_float32(stored, dtype))
    if dtype == "bfloat16":  # widened and shifted in one pass (astype, then <<=: 10% slower)
        widened = np.left_shift(stored, 16, dtype=np.uint32)
        return torch.from_numpy(widened.view(np.float32))
    return torch.from_numpy(stored.astype(np.float32))


def storage_numpy(stored: torch.Tensor) -> np.ndarray:
    """A CPU tensor in the storage dtype as numpy without a copy (bf16 as its uint16 bits)."""
    if stored.dtype == torch.bfloat16:
        return stored.view(torch.int16).numpy().view(np.uint16)
    return stored.numpy()


def prefetched(
    pool: ThreadPoolExecutor, tasks: Iterable[Callable[[], torch.Tensor]], depth: int
) -> Iterator[torch.Tensor]:
    """Run ``tasks`` in ``pool`` up to ``depth`` ahead of the consumer, yield in order
    (``depth`` 0: run each in the consumer's thread when it asks)."""
    if depth <= 0:
        yield from (task() for task in tasks)
        return
    tasks = iter(tasks)
    pending: deque[Future] = deque()

    def top_up() -> None:
        while len(pending) < depth and (task := next(tasks, None)) is not None:
            pending.append(pool.submit(task))

    top_up()
    try:
        while pending:
            result = pending.popleft().result()
            top_up()
            yield result
    finally:
        for future in pending:
            future.cancel()


class ChunkDecoder:
    """Selected rows of whole compressed chunks, decoded layer by layer in parallel.

    Never random rows from compressed chunks: that decompresses nearly every chunk per
    batch (STORAGE.md pitfall 5)."""

    def __init__(
        self, store: ActivationStore, layers: list[int], rows: np.ndarray, workers: int
    ) -> None:
        self.store = store
        self.layers = layers
        chunk_of_row = rows // store.chunk_tokens
        bounds = np.searchsorted(chunk_of_row, np.arange(store.n_chunks + 1))
        self.chunk_rows = [rows[bounds[c] : bounds[c + 1]] for c in range(store.n_chunks)]
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers))

    def n_rows(self, chunks: list[int]) -> int:
        return sum(len(self.chunk_rows[chunk]) for chunk in chunks)

    def decode(self, chunks: list[int], normaliser: Normaliser | None) -> torch.Tensor:
        """``[rows, L, d]`` on the CPU: the storage dtype, or float32 normalised by
        ``normaliser`` inside the decode tasks (a CPU consumer then only gathers rows). An
        8-bit store's storage form is packed uint8 ``[rows, L, d + 4]`` (codes, scale)."""
        sizes = [len(self.chunk_rows[chunk]) for chunk in chunks]
        store = self.store
        quantised = is_quantised(store.dtype)
        width = store.d_model
        if normaliser is not None:
            dtype = torch.float32
        elif quantised:
            dtype, width = torch.uint8, row_bytes(store.d_model, store.dtype)
        else:
            dtype = TORCH_STORAGE[store.dtype]
        out = torch.empty(sum(sizes), len(self.layers), width, dtype=dtype)
        offsets = np.cumsum([0, *sizes])

        def fill(task: tuple[int, int]) -> None:
            index, j = task
            chunk = chunks[index]
            if not sizes[index]:
                return
            start, stop = self.store.chunk_rows(chunk)
            rows = self.chunk_rows[chunk] - start
            whole = slice(rows[0], rows[-1] + 1) if rows[-1] - rows[0] + 1 == rows.size else None
            if quantised and normaliser is not None:  # numpy: 10-30x torch's CPU casts here
                codes, scales = store.read_codes(self.layers[j], start, stop)
                pick = whole if whole is not None else rows
                values = torch.from_numpy(dequantise(codes[pick], scales[pick], store.dtype))
            else:
                values = self.store.read_layer(self.layers[j], start, stop)
                values = values[whole] if whole is not None else values[torch.from_numpy(rows)]
            target = out[offsets[index] : offsets[index + 1], j]
            target.copy_(values)
            if normaliser is not None:
                normaliser.apply_layer_(target, j)

        tasks = [(i, j) for i in range(len(chunks)) for j in range(len(self.layers))]
        list(self.pool.map(fill, tasks))
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=False)


def rank_rows(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous rows of an ``n``-row global batch (sizes differ by at most
    one); pipeline/training/ddp.py slices the same way."""
    return slice(rank * n // world, (rank + 1) * n // world)


class Reader(ABC):
    """One loader mode: the batches of an epoch, normalised float32 on the device.

    Contract (tests/test_loader.py): every row once per epoch, order fixed by seed and
    epoch, ``epoch(e, skip_batches=s)`` yields exactly ``epoch(e)``'s batches after the
    first ``s``. With ``share = (rank, world)`` (torchrun) a reader yields only that rank's
    rows of each global batch, and gathers only those: the global batches are unchanged."""

    mode: str
    share: tuple[int, int] | None = None
    rows_read = 0  # rows gathered (resident, memmap) or decoded (stream): I/O per rank
    gather_ahead = 0  # batches prepared in a thread ahead of the step (0: inline)

    def mine(self, index: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """This rank's part of a global batch's row indices (all of them without a share)."""
        return index if self.share is None else index[rank_rows(len(index), *self.share)]

    @abstractmethod
    def epoch(self, epoch: int, skip_batches: int) -> Iterator[torch.Tensor]: ...

    def describe(self) -> dict:
        """Figures worth recording beside the run (window sizes, file paths)."""
        return {}

    def close(self) -> None:  # noqa: B027 - most readers hold nothing
        pass
