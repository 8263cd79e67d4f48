"""Reading a finished activation store, read-only, with integrity checks on open."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path

import crc32c
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import zarr
from safetensors.torch import load_file

from pipeline.store.format import (
    SCALES_FILE,
    dequantise,
    from_storage_numpy,
    is_quantised,
    pack,
)
from pipeline.store.record import StoreError as StoreError  # raised here; callers import it
from pipeline.store.record import StoreRecord


class ActivationStore(StoreRecord):
    """One harvested cache: ``[n_tokens, d_model]`` per hook plus token/document tables;
    the record, its checks and the manifest are ``StoreRecord``'s (torch-free)."""

    def __init__(self, root: str | Path, verify: bool = False) -> None:
        super().__init__(root)
        try:
            group = zarr.open_group(self.paths.activations, mode="r", zarr_format=3)
            self.arrays = [group[name] for name in self.hook_names]
        except Exception as err:  # zarr raises many types for bad metadata
            raise self.damaged(self.paths.activations, f"unreadable metadata ({err})") from None
        self.d_model = int(self.arrays[0].shape[1])
        for name, array in zip(self.hook_names, self.arrays, strict=True):
            if array.shape[0] != self.n_tokens:
                raise self.damaged(self.paths.array(name), f"shape {array.shape} != record")
        self.scales = self._open_scales() if is_quantised(self.dtype) else None
        self._pool = ThreadPoolExecutor(max_workers=min(8, len(self.hook_names)))
        if verify:
            self.verify()

    def _open_scales(self) -> np.ndarray:
        """An 8-bit store's float32 scales ``[n_tokens, n_hooks]``, memory-mapped from the
        safetensors file (size and crc32c already checked against the record)."""
        path = self.paths.root / SCALES_FILE
        if SCALES_FILE not in self.record.get("files", {}):
            raise self.damaged(path, "not in the completion record")
        shape = [self.n_tokens, len(self.hook_names)]
        try:
            with open(path, "rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                entry = json.loads(handle.read(length))["scales"]
            if entry["dtype"] != "F32" or entry["shape"] != shape:
                raise ValueError(
                    f"tensor 'scales' {entry['dtype']} {entry['shape']} != F32 {shape}"
                )
            return np.memmap(
                path,
                dtype="<f4",
                mode="r",
                offset=8 + length + entry["data_offsets"][0],
                shape=tuple(shape),
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise self.damaged(path, f"unreadable ({err})") from None

    def verify(self) -> None:
        """Every file's crc32c, and every chunk decoded and compared with the harvest record."""
        self._check_files(checksums=True)
        for j, name in enumerate(self.hook_names):
            for block, expected in enumerate(self.record["block_crc32c"][name]):
                start, stop = self.chunk_rows(block)
                values = np.ascontiguousarray(self._read_array(j, start, stop))
                if crc32c.crc32c(values) != expected:
                    raise self.damaged(self._chunk_path(j, block), "checksum mismatch")

    def _chunk_path(self, layer: int, block: int) -> Path:
        return self.paths.array(self.hook_names[layer]) / "c" / str(block) / "0"

    def _read_array(self, layer: int, start: int, stop: int) -> np.ndarray:
        """Rows of one hook; a chunk that fails to decode (crc32c) names its file."""
        try:
            return self.arrays[layer][start:stop]
        except Exception as err:
            block = start // self.chunk_tokens
            last = (stop - 1) // self.chunk_tokens
            where = (
                self._chunk_path(layer, block)
                if last == block
                else self.paths.array(self.hook_names[layer]) / "c" / f"{{{block}..{last}}}" / "0"
            )
            raise self.damaged(where, f"unreadable chunk ({type(err).__name__}: {err})") from None

    @cached_property
    def stats(self) -> dict[str, torch.Tensor]:
        try:
            return load_file(self.paths.stats)
        except Exception as err:  # safetensors raises its own error types
            raise self.damaged(self.paths.stats, f"unreadable ({err})") from None

    def _table(self, path: Path, columns: list[str] | None = None) -> pa.Table:
        try:
            return pq.read_table(path, columns=columns)
        except (OSError, pa.ArrowException) as err:
            raise self.damaged(path, f"unreadable ({type(err).__name__}: {err})") from None

    def tokens(self, columns: list[str] | None = None) -> pa.Table:
        return self._table(self.paths.tokens, columns)

    def documents(self) -> pa.Table:
        return self._table(self.paths.documents)

    def read_stored(self, start: int, stop: int, layers: list[int] | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` in the storage representation, ``[rows, n_layers, d]``."""
        layers = list(range(self.n_layers)) if layers is None else layers
        first = self.arrays[layers[0]]
        out = np.empty((stop - start, len(layers), self.d_model), dtype=first.dtype)

        def read(j: int) -> None:
            out[:, j] = self._read_array(layers[j], start, stop)

        list(self._pool.map(read, range(len(layers))))
        return out

    def read_layer(self, layer: int, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of one layer, ``[rows, d]``: the storage dtype (torch), or
        for an 8-bit store packed uint8 rows ``[rows, d + 4]`` (codes, then the scale)."""
        if self.scales is not None:
            return torch.from_numpy(pack(*self.read_codes(layer, start, stop)))
        return from_storage_numpy(self._read_array(layer, start, stop), self.dtype)

    def read_codes(self, layer: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """An 8-bit store's codes ``[rows, d]`` and float32 scales ``[rows]`` of one layer."""
        scales = np.ascontiguousarray(self.scales[start:stop, layer])
        return self._read_array(layer, start, stop), scales

    def read(
        self,
        start: int,
        stop: int,
        layers: list[int] | None = None,
        hooks: list[str] | None = None,
    ) -> torch.Tensor:
        """Rows ``[start, stop)`` as float32 ``[rows, n_layers, d_model]`` in raw units;
        ``hooks`` picks layers by hook name (a coder's ``hook_names``), in that order."""
        if hooks is not None:
            if layers is not None:
                raise ValueError("read: pass layers or hooks, not both")
            layers = self.layers_of(hooks)
        stored = self.read_stored(start, stop, layers)
        if self.scales is not None:
            layers = list(range(self.n_layers)) if layers is None else layers
            scales = np.ascontiguousarray(self.scales[start:stop][:, layers])
            return torch.from_numpy(dequantise(stored, scales, self.dtype))
        return from_storage_numpy(stored, self.dtype).float()

    def layers_of(self, hooks: list[str]) -> list[int]:
        """Positions of ``hooks`` among the stored hooks; a missing one is a one-line error."""
        missing = [h for h in hooks if h not in self.hook_names]
        if missing:
            raise ValueError(f"{self.paths.root}: cache {self.key} does not store {missing}")
        return [self.hook_names.index(h) for h in hooks]
