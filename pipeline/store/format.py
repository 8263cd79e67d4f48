"""How activations sit on disk: dtypes, codecs and atomic small files.

Choices (measured in ``bench/harvest.py`` and ``../shared/STORAGE.md`` on real SmolLM2
activations): bf16 stored as its uint16 bits (zarr 3.1 has no bfloat16), byte-shuffle +
zstd level 1 (1.47x on bf16, ~1 GB/s; level 5 gains ~10% at 20x the CPU), crc32c per chunk
so a flipped bit is a read error instead of a silently wrong value, chunks of whole
token blocks across d_model (~19 MB at 16384 x 576), no sharding (concurrent partial
shard writes lose data: zarr-python #3682), ``write_empty_chunks=True`` (the fill-value
scan cost 4-6x on writes).

8-bit stores (``int8``, ``float8_e4m3``): each value is ``code * scale`` with one float32
scale per token and hook (absmax / 127 for int8, absmax / 448 for e4m3). Per token,
because the massive-activation tokens (norms 40-160x the median) would flatten every other
token under a shared scale; a per-channel scale shared by all tokens was measured worse for
fp8 and per-token-and-channel costs a scale per value (``bench/storage.py``, README
"Storage dtypes"). The codes are a zarr ``int8`` / ``uint8`` array (zarr has no float8:
the array's ``dtype`` attribute names the real one, and the bits are the OCP e4m3fn
format, ``torch.float8_e4m3fn``); the scales are ``scales.safetensors`` (tensor
``scales``, float32 ``[n_tokens, n_hooks]``) at the store's root, checksummed in the
completion record like every other small file. Readers that keep 8-bit data (memmap
file, resident tensor) hold *packed* rows: the ``d`` codes followed by the scale's 4
bytes, so a gathered row carries its scale (``packed_float32`` / ``packed_to_float32``).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pipeline.manifests.harvest import StorageSpec
from pipeline.store.record import chunk_files as chunk_files  # moved (torch-free); re-exported
from pipeline.store.record import file_crc32c
from pipeline.store.record import record_crc32c as record_crc32c
from pipeline.store.record import tree_bytes as tree_bytes

NUMPY_STORAGE = {
    "bfloat16": np.uint16,
    "float16": np.float16,
    "float32": np.float32,
    "int8": np.int8,
    "float8_e4m3": np.uint8,
}
# The dtype a harvest hands blocks to the writer in. 8-bit stores are quantised from bf16,
# so converting a bf16 store gives the same bytes as harvesting the 8-bit one directly.
TORCH_STORAGE = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "int8": torch.bfloat16,
    "float8_e4m3": torch.bfloat16,
}
# 8-bit dtypes: the largest code magnitude (the row's absmax maps to it).
QUANTISED = {"int8": 127.0, "float8_e4m3": 448.0}
SCALES_FILE = "scales.safetensors"
SCALE_BYTES = 4
# e4m3fn code -> float32 (0x7f and 0xff are NaN: never written, codes are clamped).
FP8_TABLE = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
# Two codes at once: little-endian uint16 ``lo + 256 * hi`` -> (value[lo], value[hi]). Half
# the lookups from a 512 KiB table: 2.7x faster than FP8_TABLE per byte on the 2-core VM.
FP8_PAIR_TABLE = np.stack([np.tile(FP8_TABLE, 256), np.repeat(FP8_TABLE, 256)], axis=1)


def is_quantised(dtype: str) -> bool:
    return dtype in QUANTISED


def quantise(values: torch.Tensor, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """``[rows, d]`` floats -> (codes ``[rows, d]`` in ``NUMPY_STORAGE[dtype]``, float32
    scales ``[rows]``); an all-zero row gets scale 0 and codes 0."""
    x = values.float().numpy()  # numpy: torch's CPU casts ran 10-30x slower here
    top = np.float32(QUANTISED[dtype])
    scale = np.abs(x).max(axis=1) / top
    inverse = np.divide(1, scale, out=np.zeros_like(scale), where=scale > 0)
    scaled = np.clip(x * inverse[:, None], -top, top)
    if dtype == "int8":
        return np.rint(scaled).astype(np.int8), scale  # rint: ties to even, as torch.round
    codes = torch.from_numpy(scaled).to(torch.float8_e4m3fn).view(torch.uint8)
    return codes.numpy(), scale


def codes_float32(codes: np.ndarray, dtype: str) -> np.ndarray:
    """8-bit codes -> their float32 values before scaling (exact: every code is a float32)."""
    if dtype == "int8":
        return codes.view(np.int8).astype(np.float32)
    codes = codes.view(np.uint8)
    if codes.ndim and codes.shape[-1] % 2 == 0 and codes.flags.c_contiguous:
        pairs = np.take(FP8_PAIR_TABLE, codes.view("<u2"), axis=0)  # [..., d / 2, 2]
        return pairs.reshape(codes.shape)
    return np.take(FP8_TABLE, codes)  # np.take: 2x faster than FP8_TABLE[codes]


def dequantise(codes: np.ndarray, scales: np.ndarray, dtype: str) -> np.ndarray:
    """``codes [..., d]`` and ``scales [...]`` -> float32 ``code * scale``."""
    values = codes_float32(codes, dtype)
    values *= scales[..., None]
    return values


def pack(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """``codes [..., d]`` and float32 ``scales [...]`` -> uint8 ``[..., d + 4]``."""
    out = np.empty((*codes.shape[:-1], codes.shape[-1] + SCALE_BYTES), dtype=np.uint8)
    out[..., : codes.shape[-1]] = codes.view(np.uint8)
    out[..., codes.shape[-1] :] = np.ascontiguousarray(scales, dtype="<f4")[..., None].view(
        np.uint8
    )
    return out


def packed_float32(packed: np.ndarray, dtype: str) -> np.ndarray:
    """Packed rows ``[..., d + 4]`` -> float32 ``[..., d]`` (numpy, on the host)."""
    codes = packed[..., :-SCALE_BYTES]
    scales = np.ascontiguousarray(packed[..., -SCALE_BYTES:]).view("<f4")[..., 0]
    return dequantise(codes, scales, dtype)


def packed_to_float32(packed: torch.Tensor, dtype: str) -> torch.Tensor:
    """``packed_float32`` in torch on any device, bit for bit the same values."""
    codes = packed[..., :-SCALE_BYTES]
    scales = packed[..., -SCALE_BYTES:].contiguous().view(torch.float32)
    if dtype == "int8":
        values = codes.view(torch.int8).float()
    else:
        values = codes.contiguous().view(torch.float8_e4m3fn).float()
    return values.mul_(scales)


def to_float32(stored: torch.Tensor, dtype: str) -> torch.Tensor:
    """A tensor in the readers' storage representation (packed rows for 8-bit) -> a fresh
    float32 tensor on its device."""
    if is_quantised(dtype):
        return packed_to_float32(stored, dtype)
    return stored.to(torch.float32, copy=True)


def row_bytes(d_model: int, dtype: str) -> int:
    """Bytes of one token and hook as the readers hold it (8-bit: codes plus scale)."""
    if is_quantised(dtype):
        return d_model + SCALE_BYTES
    return d_model * np.dtype(NUMPY_STORAGE[dtype]).itemsize


# zstd-gpu: frames at most this big. On SmolLM2 (bench/storage_layout.py, cpu-large store):
# 147 KB frames cost 12.7% more bytes than one frame per chunk and 0.38x its CPU decode rate
# (zarr's per-frame overhead); 590 KB frames 2.6% and 0.69x (bench/results/
# storage_layout-cpu.json), and still give nvCOMP 32 frames per 16384-row chunk and layer.
GPU_FRAME_BYTES = 1 << 20


def gpu_frame_rows(chunk_tokens: int, row_bytes: int) -> int:
    """Rows per zstd-gpu frame: the largest divisor of ``chunk_tokens`` (a shard must hold
    whole frames) whose frame fits ``GPU_FRAME_BYTES`` (512 rows = 590 KB at d=576 bf16)."""
    limit = max(1, GPU_FRAME_BYTES // row_bytes)
    return max(r for r in range(1, min(limit, chunk_tokens) + 1) if chunk_tokens % r == 0)


def codecs(spec: StorageSpec, itemsize: int) -> dict:
    """The codec chain of one chunk (for zstd-gpu: of one frame inside the shard)."""
    from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec
    from zarr.codecs.numcodecs import Shuffle

    compressors: list = []
    if spec.codec in ("zstd", "zstd-gpu"):
        if spec.shuffle:
            compressors.append(Shuffle(elementsize=itemsize))
        compressors.append(ZstdCodec(level=spec.level))
    if spec.checksum:
        compressors.append(Crc32cCodec())
    return {"serializer": BytesCodec(), "compressors": compressors}


def array_layout(spec: StorageSpec, chunk_tokens: int, d_model: int, itemsize: int) -> dict:
    """``create_array`` arguments: one chunk per block, or for zstd-gpu one shard per block
    made of independently compressed frames (same file names, one file per block).

    A shard is always written whole, by one writer: the partial-shard write race (zarr-python
    #3682) cannot happen."""
    layout = {"chunks": (chunk_tokens, d_model), **codecs(spec, itemsize)}
    if spec.codec == "zstd-gpu":
        rows = gpu_frame_rows(chunk_tokens, d_model * itemsize)
        layout.update(chunks=(rows, d_model), shards=(chunk_tokens, d_model))
    return layout


def to_storage_numpy(activations: torch.Tensor) -> np.ndarray:
    """A CPU tensor in the storage dtype -> the numpy array zarr stores."""
    if activations.dtype == torch.bfloat16:
        return activations.view(torch.int16).numpy().view(np.uint16)
    return activations.numpy()


def from_storage_numpy(stored: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored numpy values -> a tensor in the storage dtype (bf16 bits reinterpreted)."""
    if dtype == "bfloat16":
        bits = torch.from_numpy(np.ascontiguousarray(stored).view(np.int16))
        return bits.view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(stored))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, rename it over
    ``path``, fsync the directory. On any error the temporary file is removed and ``path``
    is left untouched, so a crash never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(payload))


def atomic_write_json(path: Path, value: object) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_parquet(path: Path, table) -> None:
    import pyarrow.parquet as pq

    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def is_chunk_file(relative: Path) -> bool:
    """Chunk files (``activations.zarr/<hook>/c/...``) are checked per block, not per file."""
    parts = relative.parts
    return len(parts) > 3 and parts[0] == "activations.zarr" and parts[2] == "c"


def file_checksums(root: Path, exclude: tuple[str, ...] = ()) -> dict[str, dict[str, int]]:
    """Every non-chunk file under ``root`` (relative path -> size and crc32c), sorted."""
    root = Path(root)
    record = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root)
        if is_chunk_file(relative) or relative.as_posix() in exclude:
            continue
        record[relative.as_posix()] = {"size": path.stat().st_size, "crc32c": file_crc32c(path)}
    return record


_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors encoding with sorted tensor names and sorted metadata keys.

    The reference writer orders header keys by hash map, so the same tensors could give
    different bytes; here they always give the same file, so file hashes can be compared.
    The layout is the standard one (8-byte header length, space-padded JSON, data), read
    by any safetensors loader."""
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        blob = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        offset += len(blob)
        blobs.append(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)
