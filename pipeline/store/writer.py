"""Writing an activation store block by block, crash-safely.

The unit of work is a block of ``chunk_tokens`` rows across every hook. Arrays are created
at their final shape up front (metadata is never rewritten mid-harvest). After a block's
chunks are written, a marker (safetensors: per-hook crc32c + the block's statistics) is
written atomically; a resumed harvest redoes every block without a marker. Chunk files
on disk prove nothing: only markers do.

An 8-bit store (``storage.dtype`` int8 / float8_e4m3) quantises each block as it arrives;
the marker also holds the block's scales, and ``finalize`` joins them into
``scales.safetensors``. Its statistics are those of the dequantised values: what readers
serve.
"""

from __future__ import annotations

import errno
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import crc32c
import numpy as np
import torch
import zarr
from safetensors.torch import load_file

from pipeline.manifests.harvest import StorageSpec
from pipeline.paths import StorePaths
from pipeline.store.format import (
    NUMPY_STORAGE,
    SCALES_FILE,
    array_layout,
    atomic_write_bytes,
    atomic_write_json,
    chunk_files,
    dequantise,
    file_checksums,
    is_quantised,
    quantise,
    record_crc32c,
    safetensors_bytes,
    to_storage_numpy,
    tree_bytes,
)


def hook_sums(values: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """One hook's ``[rows, d]``: sum, norm sum and squared-norm sum over kept rows (float64)."""
    kept = values[keep].double()
    norms = kept.norm(dim=1)
    return kept.sum(0), float(norms.sum()), float(norms.square().sum())


def assemble_statistics(sums: list[tuple[torch.Tensor, float, float]], keep: torch.Tensor) -> dict:
    """``hook_sums`` of every hook -> the block marker's statistics tensors."""
    return {
        "sum": torch.stack([s[0] for s in sums]),
        "norm_sum": torch.tensor([s[1] for s in sums], dtype=torch.float64),
        "sq_norm_sum": torch.tensor([s[2] for s in sums], dtype=torch.float64),
        "count": torch.tensor([int(keep.sum())], dtype=torch.float64),
    }


def block_statistics(stored: torch.Tensor, keep: torch.Tensor) -> dict:
    """Per-hook sums over the block's non-special rows, in float64 so blocks add exactly;
    one hook at a time: a whole-block float64 copy is 4x the block."""
    return assemble_statistics(
        [hook_sums(stored[:, j], keep) for j in range(stored.shape[1])], keep
    )


def array_attributes(dtype: str, hook: str, index: int) -> dict:
    """The zarr attributes that say how to read an array's values (zarr has no bf16/fp8)."""
    attributes = {"dtype": dtype, "hook": hook}
    if is_quantised(dtype):
        codes = "int8" if dtype == "int8" else "uint8 bits of float8_e4m3fn"
        attributes["encoding"] = (
            f"value = code * scale; code: {codes}; scale: float32 {SCALES_FILE} "
            f"tensor 'scales'[token, {index}]"
        )
    return attributes


class StoreWriter:
    def __init__(
        self,
        paths: StorePaths,
        hook_names: list[str],
        n_tokens: int,
        d_model: int,
        storage: StorageSpec,
    ) -> None:
        self.paths = paths
        self.hook_names = hook_names
        self.n_tokens = n_tokens
        self.storage = storage
        if is_quantised(storage.dtype) and storage.codec == "zstd-gpu":
            raise ValueError(
                f"storage.dtype {storage.dtype} needs codec zstd or none (zstd-gpu reads bf16)"
            )
        self.chunk_tokens = min(storage.chunk_tokens, n_tokens)
        self.n_blocks = -(-n_tokens // self.chunk_tokens)
        self._pool = ThreadPoolExecutor(max_workers=min(8, len(hook_names)))
        np_dtype = NUMPY_STORAGE[storage.dtype]
        group = zarr.open_group(paths.activations, mode="a", zarr_format=3)
        self.arrays = []
        for j, name in enumerate(hook_names):
            if name in group:
                array = group[name]
                block_rows = (array.shards or array.chunks)[0]
                if array.shape != (n_tokens, d_model) or block_rows != self.chunk_tokens:
                    raise ValueError(f"{paths.array(name)}: exists with another shape/chunking")
            else:
                array = group.create_array(
                    name,
                    shape=(n_tokens, d_model),
                    dtype=np_dtype,
                    fill_value=0,
                    attributes=array_attributes(storage.dtype, name, j),
                    config={"write_empty_chunks": True},
                    **array_layout(
                        storage, self.chunk_tokens, d_model, np.dtype(np_dtype).itemsize
                    ),
                )
            self.arrays.append(array)
        paths.blocks.mkdir(parents=True, exist_ok=True)

    def block_rows(self, block: int) -> tuple[int, int]:
        start = block * self.chunk_tokens
        return start, min(start + self.chunk_tokens, self.n_tokens)

    def missing_blocks(self) -> list[int]:
        return [b for b in range(self.n_blocks) if not self.paths.block_marker(b).is_file()]

    def write_block(self, block: int, stored: torch.Tensor, keep: torch.Tensor) -> None:
        """``stored``: ``[rows, n_hooks, d_model]`` CPU tensor in the storage dtype."""
        start, stop = self.block_rows(block)
        if stored.shape[0] != stop - start:
            raise ValueError(f"block {block}: expected {stop - start} rows, got {stored.shape[0]}")

        if is_quantised(self.storage.dtype):
            self._write_quantised(block, stored, keep)
            return

        def write(j: int) -> int:
            values = np.ascontiguousarray(to_storage_numpy(stored[:, j]))
            self.arrays[j][start:stop] = values
            return crc32c.crc32c(values)

        crcs = list(self._pool.map(write, range(len(self.hook_names))))
        stats = block_statistics(stored, keep)
        self._mark(block, stats, crcs)

    def _write_quantised(self, block: int, stored: torch.Tensor, keep: torch.Tensor) -> None:
        """Quantise each hook in a pool thread; the marker holds the codes' crc32c, the
        statistics of the dequantised values and the block's scales ``[rows, n_hooks]``."""
        dtype = self.storage.dtype

        def write(j: int) -> tuple:
            codes, scales = quantise(stored[:, j], dtype)
            self.arrays[j][slice(*self.block_rows(block))] = codes
            values = torch.from_numpy(dequantise(codes, scales, dtype))
            return crc32c.crc32c(codes), scales, hook_sums(values, keep)

        done = list(self._pool.map(write, range(len(self.hook_names))))
        stats = assemble_statistics([d[2] for d in done], keep)
        stats["scales"] = torch.from_numpy(np.stack([d[1] for d in done], axis=1))
        self._mark(block, stats, [d[0] for d in done])

    def _mark(self, block: int, stats: dict, crcs: list[int]) -> None:
        start, stop = self.block_rows(block)
        stats["crc32c"] = torch.tensor(crcs, dtype=torch.int64)
        metadata = {"block": str(block), "rows": f"{start},{stop}"}
        atomic_write_bytes(self.paths.block_marker(block), safetensors_bytes(stats, metadata))

    def finalize(self, seconds: float) -> dict:
        """Aggregate block statistics and write the completion record."""
        for stray in self.paths.activations.rglob("*.partial"):
            stray.unlink()  # zarr's temporary file of a chunk write a kill interrupted
        markers = [load_file(self.paths.block_marker(b)) for b in range(self.n_blocks)]
        totals = {k: sum(m[k] for m in markers) for k in ("sum", "norm_sum", "sq_norm_sum")}
        count = float(sum(m["count"] for m in markers))
        if is_quantised(self.storage.dtype):
            scales = torch.cat([m["scales"] for m in markers])
            atomic_write_bytes(
                self.paths.root / SCALES_FILE,
                safetensors_bytes({"scales": scales}, {"dtype": self.storage.dtype}),
            )
        record = {
            "n_tokens": self.n_tokens,
            "hooks": self.hook_names,
            "storage": self.storage.model_dump(),
            "chunk_tokens": self.chunk_tokens,
            "n_blocks": self.n_blocks,
            "block_crc32c": {
                name: [int(m["crc32c"][j]) for m in markers]
                for j, name in enumerate(self.hook_names)
            },
            "chunk_files": {name: chunk_files(self.paths.array(name)) for name in self.hook_names},
            "statistics_tokens": count,
            "harvest_seconds": seconds,
            "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self._pool.shutdown()
        return {"record": record, "totals": totals, "count": count}

    def close(self) -> None:
        self._pool.shutdown()


def statistics_from_totals(totals: dict, count: float) -> dict[str, torch.Tensor]:
    """Per-hook mean, mean norm, RMS norm, and centred RMS norm from ``block_statistics``
    sums: what the normaliser reads (the store's file, or an outlier scan's kept tokens)."""
    mean = totals["sum"] / count
    mean_norm = totals["norm_sum"] / count
    rms = (totals["sq_norm_sum"] / count).sqrt()
    centred_rms = (totals["sq_norm_sum"] / count - mean.square().sum(1)).clamp_min(0).sqrt()
    return {
        "mean": mean.float(),
        "mean_norm": mean_norm.float(),
        "rms_norm": rms.float(),
        "centred_rms_norm": centred_rms.float(),
    }


def write_statistics(path: Path, totals: dict, count: float) -> None:
    """The store's normalisation statistics file."""
    tensors = statistics_from_totals(totals, count)
    atomic_write_bytes(path, safetensors_bytes(tensors, {"tokens": str(int(count))}))


def write_completion(path: Path, record: dict) -> None:
    """Written last: the size and crc32c of every other non-chunk file of the store (tables,
    statistics, manifest, markers, zarr metadata) join the record, so opening the store can
    prove that nothing changed since the harvest (chunks keep their per-block crc32c)."""
    files = file_checksums(Path(path).parent, exclude=(Path(path).name,))
    record = {**record, "files": files}
    atomic_write_json(path, {**record, "record_crc32c": record_crc32c(record)})


# --------------------------------------------------------------------------- disk space

ITEM_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "int8": 1, "float8_e4m3": 1}
TABLE_BYTES_PER_TOKEN = 64  # tokens.parquet + markers, generous (~20-40 B measured)


class DiskFullError(ValueError):
    """Not enough disk for a job; the one-line message names the path and the figures."""


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def estimate_store_bytes(n_tokens: int, n_hooks: int, d_model: int, dtype: str) -> int:
    """An upper bound on a store's size: uncompressed activations plus the tables
    (shuffle + zstd makes bf16 ~1.5x smaller, so real stores sit well under it)."""
    scale_bytes = 4 if is_quantised(dtype) else 0  # one float32 scale per token and hook
    per_hook = d_model * ITEM_BYTES[dtype] + scale_bytes
    return n_tokens * (n_hooks * per_hook + TABLE_BYTES_PER_TOKEN)


def free_bytes(path: Path) -> int:
    """Free space on the filesystem that holds ``path`` (or its nearest existing parent)."""
    probe = Path(path)
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_free_space(path: Path, needed: int, what: str) -> None:
    """Refuse up front, in one line, when ``path``'s disk cannot hold ``needed`` bytes."""
    free = free_bytes(path)
    if needed > free:
        raise DiskFullError(
            f"{path}: {what} needs about {human_bytes(needed)} but only {human_bytes(free)} "
            "is free there; free space or choose another root"
        )


def check_store_space(
    root: Path, n_tokens: int, n_hooks: int, d_model: int, dtype: str, what: str
) -> None:
    """Refuse before writing when the disk cannot hold a store of this size, less what an
    interrupted run already wrote into ``root`` (it resumes from there)."""
    needed = estimate_store_bytes(n_tokens, n_hooks, d_model, dtype)
    written = tree_bytes(root) if root.is_dir() else 0
    check_free_space(root, needed - written, f"{what} (uncompressed upper bound)")


def seal_store(writer: StoreWriter, paths: StorePaths, seconds: float) -> None:
    """Close a fully written store: block markers joined, statistics, then ``complete.json``
    last. The caller renames ``.incomplete`` into place."""
    summary = writer.finalize(seconds)
    write_statistics(paths.stats, summary["totals"], summary["count"])
    write_completion(paths.completion, summary["record"])


@contextmanager
def disk_full_as_one_line(path: Path, what: str) -> Iterator[None]:
    """ENOSPC (no space left) while writing becomes ``DiskFullError`` naming the file;
    what was written stays resumable, so the message says to rerun."""
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = err.filename or path
        raise DiskFullError(
            f"{where}: no space left on device while writing {what} "
            f"({human_bytes(free_bytes(Path(path)))} free); free space and rerun: "
            "the partial work is kept and resumes"
        ) from None
