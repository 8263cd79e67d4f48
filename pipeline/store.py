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

from pipeline.paths import StorePaths
from pipeline.store_format import chunk_files, from_storage_numpy, tree_bytes


class StoreError(RuntimeError):
    """A store that is missing, incomplete or corrupted; the message names the file."""


class ActivationStore:
    """One harvested cache: ``[n_tokens, d_model]`` per hook plus token/document tables."""

    def __init__(self, root: str | Path, verify: bool = False) -> None:
        self.paths = StorePaths(Path(root))
        completion = self.paths.completion
        if not completion.is_file():
            raise StoreError(f"{self.paths.root}: not a finished store (no {completion.name})")
        self.record = json.loads(completion.read_text())
        self.hook_names: list[str] = self.record["hooks"]
        self.n_tokens: int = self.record["n_tokens"]
        self.chunk_tokens: int = self.record["chunk_tokens"]
        self.dtype: str = self.record["storage"]["dtype"]
        self._check_files()
        group = zarr.open_group(self.paths.activations, mode="r", zarr_format=3)
        self.arrays = [group[name] for name in self.hook_names]
        self.d_model = int(self.arrays[0].shape[1])
        for name, array in zip(self.hook_names, self.arrays, strict=True):
            if array.shape[0] != self.n_tokens:
                raise StoreError(f"{self.paths.array(name)}: shape {array.shape} != record")
        self._pool = ThreadPoolExecutor(max_workers=min(8, len(self.hook_names)))
        if verify:
            self.verify()

    def _check_files(self) -> None:
        """Every chunk file the completion record lists exists with its recorded size."""
        for name, expected in self.record["chunk_files"].items():
            actual = chunk_files(self.paths.array(name))
            for chunk, size in expected.items():
                if chunk not in actual:
                    raise StoreError(f"{self.paths.array(name) / chunk}: chunk file missing")
                if actual[chunk] != size:
                    raise StoreError(
                        f"{self.paths.array(name) / chunk}: {actual[chunk]} bytes, "
                        f"expected {size} (truncated or overwritten)"
                    )

    def verify(self) -> None:
        """Decode every chunk and compare its crc32c with the harvest record."""
        for j, name in enumerate(self.hook_names):
            for block, expected in enumerate(self.record["block_crc32c"][name]):
                start, stop = self.chunk_rows(block)
                try:
                    values = np.ascontiguousarray(self.arrays[j][start:stop])
                except Exception as err:
                    raise StoreError(f"{self.paths.array(name)}: block {block}: {err}") from err
                if crc32c.crc32c(values) != expected:
                    raise StoreError(f"{self.paths.array(name)}: block {block}: checksum mismatch")

    @property
    def key(self) -> str:
        return self.paths.root.name

    @property
    def n_layers(self) -> int:
        return len(self.hook_names)

    @property
    def n_chunks(self) -> int:
        return -(-self.n_tokens // self.chunk_tokens)

    def chunk_rows(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_tokens
        return start, min(start + self.chunk_tokens, self.n_tokens)

    @cached_property
    def manifest(self) -> dict:
        return json.loads(self.paths.manifest.read_text())

    @cached_property
    def stats(self) -> dict[str, torch.Tensor]:
        return load_file(self.paths.stats)

    def tokens(self, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.paths.tokens, columns=columns)

    def documents(self) -> pa.Table:
        return pq.read_table(self.paths.documents)

    def read_stored(self, start: int, stop: int, layers: list[int] | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` in the storage representation, ``[rows, n_layers, d]``."""
        layers = list(range(self.n_layers)) if layers is None else layers
        first = self.arrays[layers[0]]
        out = np.empty((stop - start, len(layers), self.d_model), dtype=first.dtype)

        def read(j: int) -> None:
            out[:, j] = self.arrays[layers[j]][start:stop]

        list(self._pool.map(read, range(len(layers))))
        return out

    def read_layer(self, layer: int, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of one layer, ``[rows, d]``, in the storage dtype (torch)."""
        return from_storage_numpy(self.arrays[layer][start:stop], self.dtype)

    def read(self, start: int, stop: int, layers: list[int] | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` as float32 ``[rows, n_layers, d_model]`` in raw units."""
        return from_storage_numpy(self.read_stored(start, stop, layers), self.dtype).float()

    def size_on_disk(self) -> int:
        return tree_bytes(self.paths.root)
