"""A finished store's completion record, opened with its integrity checks, without torch.

``ActivationStore`` (reader.py) extends ``StoreRecord`` with the arrays; ``pipeline show``
opens only this, so it answers at once (no torch, zarr or numpy import). The small
torch-free file helpers (crc32c of a file or record, chunk listings, directory sizes) live
here for the same reason; format.py re-exports them for the writer.
"""

from __future__ import annotations

import contextlib
import json
import math
from array import array
from functools import cached_property
from pathlib import Path

from pipeline.paths import StorePaths


class StoreError(RuntimeError):
    """A store that is missing, incomplete or corrupted; the message names the file."""


def tree_bytes(root: Path) -> int:
    """Bytes in every file under ``root``."""
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def chunk_files(array_dir: Path) -> dict[str, int]:
    """Chunk file name (relative to the array) -> size in bytes."""
    chunks = array_dir / "c"
    if not chunks.is_dir():
        return {}
    return {
        str(p.relative_to(array_dir)): p.stat().st_size for p in chunks.rglob("*") if p.is_file()
    }


def file_crc32c(path: Path, block: int = 1 << 22) -> int:
    """crc32c of a whole file, streamed (hardware crc32c runs at GB/s: cheap on open)."""
    import crc32c

    value = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            value = crc32c.crc32c(chunk, value)
    return value


def record_crc32c(record: dict) -> int:
    """crc32c of a record's canonical JSON: ``complete.json`` checks itself with it."""
    import crc32c

    return crc32c.crc32c(json.dumps(record, sort_keys=True, separators=(",", ":")).encode())


def read_float32_safetensors(path: Path) -> dict[str, tuple[list[int], array]]:
    """A safetensors file's F32 tensors as (shape, flat ``array('f')``), read without torch
    or numpy (the store's statistics, for ``pipeline show``); other dtypes are skipped."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
        data = handle.read()
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__" or entry["dtype"] != "F32":
            continue
        start, stop = entry["data_offsets"]
        values = array("f")
        values.frombytes(data[start:stop])
        tensors[name] = (list(entry["shape"]), values)
    return tensors


class StoreRecord:
    """A finished store's completion record, manifest and statistics, checked on open: the
    record's own crc32c, every listed file's size, the small files' crc32c and the chunk
    files' sizes (``verify`` in reader.py also decodes every chunk)."""

    def __init__(self, root: str | Path) -> None:
        self.paths = StorePaths(Path(root))
        completion = self.paths.completion
        if not completion.is_file():
            raise StoreError(f"{self.paths.root}: not a finished store (no {completion.name})")
        try:
            self.record = json.loads(completion.read_text())
            saved = self.record.pop("record_crc32c", None)  # absent in older stores
            if saved is not None and saved != record_crc32c(self.record):
                raise ValueError("checksum mismatch (the record changed since harvest)")
            self.hook_names: list[str] = self.record["hooks"]
            self.n_tokens: int = self.record["n_tokens"]
            self.chunk_tokens: int = self.record["chunk_tokens"]
            self.dtype: str = self.record["storage"]["dtype"]
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise self.damaged(completion, f"unreadable ({err})") from None
        self._check_files(checksums=False)

    def damaged(self, path: Path, problem: str) -> StoreError:
        """One line: the file, what is wrong, and the commands that rebuild the store."""
        rebuild = "pipeline harvest <its harvest manifest>"
        with contextlib.suppress(OSError, ValueError, AttributeError, KeyError, TypeError):
            stored = json.loads(self.paths.manifest.read_text())
            if stored.get("converted_from"):  # stages/convert.py derived it
                dtype = stored["manifest"]["storage"]["dtype"]
                rebuild = f"pipeline convert {stored['converted_from']} --dtype {dtype}"
            elif stored.get("source"):
                rebuild = f"pipeline harvest {stored['source']}"
        return StoreError(
            f"{path}: {problem}; the store is damaged: delete it and re-harvest "
            f"(rm -rf {self.paths.root} && {rebuild})"
        )

    def _check_files(self, checksums: bool) -> None:
        """Every file the completion record lists exists with its recorded size; the small
        files (tables, statistics, metadata) also match their crc32c, all of them with
        ``checksums`` (the block markers are skipped on open: training never reads them).

        Stores harvested before ``files`` was recorded carry chunk sizes only."""
        for relative, expected in self.record.get("files", {}).items():
            path = self.paths.root / relative
            if not path.is_file():
                raise self.damaged(path, "file missing")
            size = path.stat().st_size
            if size != expected["size"]:
                raise self.damaged(path, f"{size} bytes, expected {expected['size']} (truncated?)")
            if not checksums and relative.startswith("blocks/"):
                continue
            if file_crc32c(path) != expected["crc32c"]:
                raise self.damaged(path, "checksum mismatch (the file changed since harvest)")
        for name, expected in self.record["chunk_files"].items():
            actual = chunk_files(self.paths.array(name))
            for chunk, size in expected.items():
                path = self.paths.array(name) / chunk
                if chunk not in actual:
                    raise self.damaged(path, "chunk file missing")
                if actual[chunk] != size:
                    raise self.damaged(path, f"{actual[chunk]} bytes, expected {size} (truncated?)")

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
    def d_model(self) -> int:
        """Width of the stored rows, from the first array's zarr metadata (JSON)."""
        path = self.paths.array(self.hook_names[0]) / "zarr.json"
        try:
            return int(json.loads(path.read_text())["shape"][1])
        except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
            raise self.damaged(path, f"unreadable metadata ({err})") from None

    @cached_property
    def manifest(self) -> dict:
        try:
            return json.loads(self.paths.manifest.read_text())
        except ValueError as err:
            raise self.damaged(self.paths.manifest, f"unreadable ({err})") from None

    def hook_statistics(self) -> list[tuple[str, float, float, float]]:
        """Per hook: its name, mean and RMS token norm, and the norm of its mean vector."""
        try:
            stats = read_float32_safetensors(self.paths.stats)
            (_, mean_norm), (_, rms_norm) = stats["mean_norm"], stats["rms_norm"]
            (_, d), mean = stats["mean"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise self.damaged(self.paths.stats, f"unreadable ({err})") from None
        return [
            (
                name,
                mean_norm[j],
                rms_norm[j],
                math.sqrt(math.fsum(v * v for v in mean[j * d : (j + 1) * d])),
            )
            for j, name in enumerate(self.hook_names)
        ]

    def size_on_disk(self) -> int:
        return tree_bytes(self.paths.root)
