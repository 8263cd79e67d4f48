"""The memmap mode's file: one split of a store decoded once, uncompressed, read-only.

``[n_rows, L, d]`` in the storage representation (bf16 as uint16 bits; an 8-bit store as
packed uint8 ``[n_rows, L, d + 4]``, codes then scale: half bf16's bytes), rows in the
split's order. Keyed by the store key, the layer list, the split and a digest of the split's
row indices (a changed split definition never reuses a stale file). Written to a
``.incomplete`` file and renamed; a JSON record beside it holds the shape, the size and the
crc32c of the bytes, checked when the file is opened. To remove it, delete the ``.bin`` and
``.json`` (``pipeline.paths.decoded_split_file`` names them; $FMX_DECODED_DIR moves them).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import crc32c
import numpy as np

from pipeline.paths import decoded_split_file
from pipeline.store.format import (
    NUMPY_STORAGE,
    atomic_write_json,
    fsync_dir,
    is_quantised,
    row_bytes,
    to_storage_numpy,
)
from pipeline.store.locks import exclusive_lock
from pipeline.training.readers.base import ChunkDecoder

VERIFY_BLOCK_BYTES = 64 << 20


class DecodedFileError(RuntimeError):
    """A decoded file whose size or checksum disagrees with its record."""


@dataclass(frozen=True)
class DecodedFile:
    path: Path
    shape: tuple[int, int, int]
    dtype: np.dtype

    @property
    def record(self) -> Path:
        return self.path.with_suffix(".json")

    def open(self) -> np.memmap:
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=self.shape)

    @property
    def n_bytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


def decoded_file_for(decoder: ChunkDecoder, split: str) -> DecodedFile:
    """Where the split lives decoded (it may not exist yet)."""
    store = decoder.store
    rows = np.concatenate(decoder.chunk_rows).astype(np.int64)
    material = hashlib.sha256()
    material.update(json.dumps({"layers": decoder.layers, "split": split}).encode())
    material.update(rows.tobytes())
    path = decoded_split_file(store.key, material.hexdigest()[:12])
    if is_quantised(store.dtype):  # packed rows: codes then the float32 scale
        shape = (int(rows.size), len(decoder.layers), row_bytes(store.d_model, store.dtype))
        return DecodedFile(path, shape, np.dtype(np.uint8))
    shape = (int(rows.size), len(decoder.layers), store.d_model)
    return DecodedFile(path, shape, np.dtype(NUMPY_STORAGE[store.dtype]))


def checksum(path: Path) -> int:
    value = 0
    with open(path, "rb") as handle:
        while block := handle.read(VERIFY_BLOCK_BYTES):
            value = crc32c.crc32c(block, value=value)
    return value


def verify(file: DecodedFile) -> None:
    """Size and crc32c against the record; raises DecodedFileError naming the file."""
    record = json.loads(file.record.read_text())
    size = file.path.stat().st_size
    if size != record["bytes"] or tuple(record["shape"]) != file.shape:
        raise DecodedFileError(f"{file.path}: {size} bytes, record says {record['bytes']}")
    if checksum(file.path) != record["crc32c"]:
        raise DecodedFileError(f"{file.path}: checksum mismatch (delete it to rebuild)")


def build(file: DecodedFile, decoder: ChunkDecoder, split: str) -> None:
    """Decode every chunk once into ``<file>.incomplete``, checksum it, rename it."""
    file.path.parent.mkdir(parents=True, exist_ok=True)
    partial = file.path.with_name(f"{file.path.name}.{os.getpid()}.incomplete")
    out = np.memmap(partial, dtype=file.dtype, mode="w+", shape=file.shape)
    value, offset = 0, 0
    try:
        for chunk in range(decoder.store.n_chunks):
            if not len(decoder.chunk_rows[chunk]):
                continue
            decoded = decoder.decode([chunk], None).cpu()  # decode: gpu gives device tensors
            values = np.ascontiguousarray(to_storage_numpy(decoded))
            out[offset : offset + values.shape[0]] = values
            value = crc32c.crc32c(values, value=value)
            offset += values.shape[0]
        out.flush()
        del out
        with open(partial, "rb+") as handle:
            os.fsync(handle.fileno())
        record = {
            "store": decoder.store.key,
            "layers": decoder.layers,
            "split": split,
            "shape": list(file.shape),
            "dtype": decoder.store.dtype,
            "bytes": file.n_bytes,
            "crc32c": value,
        }
        atomic_write_json(file.record, record)
        os.replace(partial, file.path)
        fsync_dir(file.path.parent)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def ensure(file: DecodedFile, decoder: ChunkDecoder, split: str) -> bool:
    """Build the file unless a verified copy exists; True when it was (re)built.

    Under a lock beside the file: of the processes that want it at once (torchrun ranks,
    parallel runs on one cache) one decodes the split, the others wait and verify it."""
    with exclusive_lock(file.path.with_name(f"{file.path.name}.lock"), what="decode"):
        if file.path.is_file() and file.record.is_file():
            try:
                verify(file)
                return False
            except DecodedFileError as err:
                print(f"loader: {err}; rebuilding it")
        build(file, decoder, split)
        return True


def remove(file: DecodedFile) -> None:
    file.path.unlink(missing_ok=True)
    file.record.unlink(missing_ok=True)
