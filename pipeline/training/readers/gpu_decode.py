"""``decode: gpu``: a zstd-gpu store's frames decompressed by nvCOMP on the device.

Why not zarr: zarr-python (3.1 here, and its main branch) has no GPU codec.
``zarr.config.enable_gpu()`` only puts the decoded array in device memory; decompression
stays on the host (its GPU guide says so; the nvCOMP zstd codec, zarr-python PR #2863, was
never merged). So this reads the shard files itself: the shard index (offsets and sizes,
crc32c-checked), each frame's crc32c on the host (GB/s), then one batched nvCOMP zstd call
for every frame of every (chunk, layer) of a window, then the byte shuffle undone on the
device (a transpose) and the rows of the split picked out there.

Why a storage option: a default store's chunk is one ~19 MB zstd frame per layer. nvCOMP
decodes a frame with one thread block, so a window of 4 chunks x 10 layers gives 40 blocks
to a GPU that runs thousands (and nvCOMP before 5.0 refuses frames over 16 MiB). The
zstd-gpu layout stores the same codec chain (shuffle + zstd + crc32c) per frame of at most
1 MiB (512 rows at d=576), as zarr shards of the block, so the CPU path reads it through
zarr unchanged.

The frame decompressor is a parameter: ``NvcompFrames`` on CUDA, ``CpuFrames`` (numcodecs)
in the CPU tests, which check everything around it bit for bit against zarr's own read.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import crc32c
import numpy as np
import torch

from pipeline.store.format import TORCH_STORAGE
from pipeline.store.reader import ActivationStore
from pipeline.training.readers.base import ChunkDecoder, Normaliser

# nvCOMP's Python package per CUDA major version (bench/gpu_loader.sh and
# bench/gpu_wheels.sh install the one torch's CUDA needs)
NVCOMP_PINS = {"12": "nvidia-nvcomp-cu12==5.1.0.21", "13": "nvidia-nvcomp-cu13==6.0.0.12"}
EMPTY = np.iinfo(np.uint64).max  # a shard index entry of a frame never written
ALIGN = 16  # bytes: each frame's start in the device buffer handed to nvCOMP
FrameDecoder = Callable[[list[bytes], int], torch.Tensor]


class GpuDecodeError(ValueError):
    """``decode: gpu`` cannot run here, or not on this store; one line saying why."""


def require_gpu_layout(store: ActivationStore) -> None:
    """The store must have been harvested with ``storage: {codec: zstd-gpu}``."""
    codec = store.record["storage"].get("codec", "zstd")
    if codec != "zstd-gpu":
        raise GpuDecodeError(
            f"{store.paths.root}: decode: gpu needs a store harvested with "
            f"storage: {{codec: zstd-gpu}} (this one has codec {codec!r}, one "
            f"{store.chunk_tokens * store.d_model * 2 / 1e6:.0f} MB frame per chunk and "
            f"layer); harvest again with that storage option, or use decode: cpu"
        )


def nvcomp_pin(cuda: str | None = None) -> str:
    """The nvCOMP package for a CUDA version (default: the one torch was built with)."""
    major = (cuda or torch.version.cuda or "12").split(".")[0]
    return NVCOMP_PINS.get(major, NVCOMP_PINS["12"])


def require_cuda(device: torch.device) -> None:
    """A CUDA device and nvCOMP's Python package, or one line naming what is missing."""
    if device.type != "cuda":
        raise GpuDecodeError(
            f"decode: gpu needs a CUDA device, and this run's device is {device}"
            + ("" if torch.cuda.is_available() else " (no CUDA device on this machine)")
        )
    if not torch.cuda.is_available():
        raise GpuDecodeError(f"decode: gpu: device {device} but torch sees no CUDA device")
    try:
        from nvidia import nvcomp  # noqa: F401
    except ImportError:
        raise GpuDecodeError(
            f"decode: gpu needs NVIDIA nvCOMP's Python package: pip install {nvcomp_pin()}"
        ) from None


def unshuffle(raw: torch.Tensor, itemsize: int) -> torch.Tensor:
    """numcodecs' byte shuffle undone on ``[frames, bytes]`` uint8: byte ``b`` of element
    ``i`` was stored at ``b * n + i``; a transpose puts it back at ``i * itemsize + b``."""
    if itemsize == 1:
        return raw
    frames, size = raw.shape
    planes = raw.view(frames, itemsize, size // itemsize)
    return planes.transpose(1, 2).contiguous().view(frames, size)


class CpuFrames:
    """Frames decompressed by numcodecs on the host: the reference the tests compare with."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        from numcodecs import Zstd

        self.zstd = Zstd()
        self.device = torch.device(device)

    def __call__(self, frames: list[bytes], frame_bytes: int) -> torch.Tensor:
        out = np.empty((len(frames), frame_bytes), dtype=np.uint8)
        for i, frame in enumerate(frames):
            out[i] = np.frombuffer(self.zstd.decode(frame), dtype=np.uint8)
        return torch.from_numpy(out).to(self.device)


def frame_bounds(sizes: list[int]) -> tuple[list[tuple[int, int]], int]:
    """Each frame's ``(start, stop)`` in one staging buffer, starts ``ALIGN``-aligned
    (nvCOMP's zstd wants 8-byte aligned inputs), and the buffer's size."""
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += -(-size // ALIGN) * ALIGN
    return bounds, start


def pack_frames(frames: list[bytes], bounds: list[tuple[int, int]], staging: np.ndarray) -> None:
    for frame, (start, stop) in zip(frames, bounds, strict=True):
        staging[start:stop] = np.frombuffer(frame, dtype=np.uint8)


class NvcompFrames:
    """Frames decompressed by nvCOMP's batched zstd on ``device``, one call per window.

    nvCOMP codecs are thread-local; each calling thread gets its own codec and CUDA stream,
    and waits for its stream before returning, so the tensor is ready for any consumer."""

    def __init__(self, device: torch.device) -> None:
        require_cuda(device)
        self.device = device
        self.local = threading.local()

    def _codec(self):
        from nvidia import nvcomp

        if not hasattr(self.local, "codec"):
            stream = torch.cuda.Stream(self.device)
            self.local.stream = stream
            self.local.codec = nvcomp.Codec(
                algorithm="Zstd",
                bitstream_kind=nvcomp.BitstreamKind.RAW,
                device_id=self.device.index or 0,
                cuda_stream=stream.cuda_stream,
            )
        return self.local.codec, self.local.stream

    def __call__(self, frames: list[bytes], frame_bytes: int) -> torch.Tensor:
        from nvidia import nvcomp

        codec, stream = self._codec()
        bounds, total = frame_bounds([len(f) for f in frames])
        host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        pack_frames(frames, bounds, host.numpy())
        # allocated on the consumer's stream (freed there later); the decode stream waits
        # for the work already queued there, which may still use this memory's last owner
        out = torch.empty(len(frames), frame_bytes, dtype=torch.uint8, device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            packed = host.to(self.device, non_blocking=True)
            inputs = nvcomp.as_arrays([packed[a:b] for a, b in bounds])
            outputs = codec.decode(inputs)  # kept alive until the stream is done with them
            for i, array in enumerate(outputs):
                values = torch.as_tensor(array, device=self.device).view(torch.uint8).view(-1)
                if values.numel() != frame_bytes:
                    raise GpuDecodeError(
                        f"nvCOMP gave {values.numel()} bytes for a {frame_bytes}-byte frame"
                    )
                out[i].copy_(values)
        stream.synchronize()
        del outputs, inputs, packed, host
        return out


def frame_decoder_for(device: torch.device) -> FrameDecoder:
    """The device's frame decompressor (the CPU tests substitute ``CpuFrames``)."""
    return NvcompFrames(device)


class ShardLayout:
    """What the GPU path needs from a zstd-gpu array's metadata, checked once on open."""

    def __init__(self, store: ActivationStore) -> None:
        from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
        from zarr.codecs.numcodecs import Shuffle

        array = store.arrays[0]
        sharding = array.metadata.codecs[0] if len(array.metadata.codecs) == 1 else None
        if not isinstance(sharding, ShardingCodec) or sharding.index_location.value != "end":
            raise GpuDecodeError(f"{store.paths.activations}: not a zstd-gpu shard layout")
        inner = list(sharding.codecs)
        names = [type(c).__name__ for c in inner]
        self.shuffle = any(isinstance(c, Shuffle) for c in inner)
        self.checksum = isinstance(inner[-1], Crc32cCodec)
        expected = [BytesCodec, *([Shuffle] if self.shuffle else []), ZstdCodec]
        if [type(c) for c in inner[: len(expected)]] != expected or len(inner) != len(
            expected
        ) + int(self.checksum):
            raise GpuDecodeError(f"{store.paths.activations}: codec chain {names} not decodable")
        self.index_checksum = any(isinstance(c, Crc32cCodec) for c in sharding.index_codecs)
        self.frame_rows = int(sharding.chunk_shape[0])
        self.n_frames = -(-store.chunk_tokens // self.frame_rows)
        self.itemsize = np.dtype(array.dtype).itemsize
        self.frame_bytes = self.frame_rows * store.d_model * self.itemsize


def shard_frames(path: Path, layout: ShardLayout) -> list[bytes | None]:
    """The zstd frames of one shard file (None: a frame never written), crc32c-checked."""
    data = path.read_bytes()
    index_bytes = layout.n_frames * 16
    tail = 4 if layout.index_checksum else 0
    index = data[len(data) - index_bytes - tail : len(data) - tail]
    if tail and crc32c.crc32c(index) != int.from_bytes(data[-4:], "little"):
        raise GpuDecodeError(f"{path}: shard index checksum mismatch")
    entries = np.frombuffer(index, dtype="<u8").reshape(-1, 2)
    frames: list[bytes | None] = []
    for offset, size in entries:
        if offset == EMPTY and size == EMPTY:
            frames.append(None)
            continue
        frame = data[int(offset) : int(offset + size)]
        if layout.checksum:
            frame, stored = frame[:-4], frame[-4:]
            if crc32c.crc32c(frame) != int.from_bytes(stored, "little"):
                raise GpuDecodeError(f"{path}: frame at byte {offset}: checksum mismatch")
        frames.append(frame)
    return frames


class GpuChunkDecoder(ChunkDecoder):
    """``ChunkDecoder`` whose output is on ``device``: chunks read and checked on the host,
    decompressed by ``frames`` (nvCOMP on CUDA), unshuffled and row-selected on the device."""

    def __init__(
        self,
        store: ActivationStore,
        layers: list[int],
        rows: np.ndarray,
        workers: int,
        *,
        device: torch.device,
        frames: FrameDecoder,
    ) -> None:
        require_gpu_layout(store)
        super().__init__(store, layers, rows, workers)
        self.layout = ShardLayout(store)
        self.device = device
        self.frames = frames
        self.rows_read = 0  # rows the decoder handed out: what the DDP tests count

    def _shard(self, chunk: int, layer: int) -> list[bytes | None]:
        path = self.store.paths.array(self.store.hook_names[layer]) / "c" / str(chunk) / "0"
        return shard_frames(path, self.layout)

    def decode(self, chunks: list[int], normaliser: Normaliser | None) -> torch.Tensor:
        """``[rows, L, d]`` on the device: the storage dtype, or float32 normalised."""
        layout, store = self.layout, self.store
        sizes = [len(self.chunk_rows[chunk]) for chunk in chunks]
        tasks = [(i, j) for i in range(len(chunks)) for j in range(len(self.layers)) if sizes[i]]
        shards = list(self.pool.map(lambda t: self._shard(chunks[t[0]], self.layers[t[1]]), tasks))
        present = [frame for shard in shards for frame in shard if frame is not None]
        raw = self.frames(present, layout.frame_bytes) if present else None
        if raw is not None and layout.shuffle:
            raw = unshuffle(raw, layout.itemsize)
        storage = TORCH_STORAGE[store.dtype]
        values = None if raw is None else raw.view(storage).view(len(present), -1, store.d_model)
        dtype = torch.float32 if normaliser is not None else storage
        shape = (sum(sizes), len(self.layers), store.d_model)
        out = torch.empty(shape, dtype=dtype, device=self.device)
        offsets = np.cumsum([0, *sizes])
        zeros = torch.zeros(layout.frame_rows, store.d_model, dtype=storage, device=self.device)
        used = 0
        for (i, j), shard in zip(tasks, shards, strict=True):
            parts = []
            for frame in shard:
                parts.append(zeros if frame is None else values[used])
                used += frame is not None
            start, _ = store.chunk_rows(chunks[i])
            rows = torch.from_numpy(self.chunk_rows[chunks[i]] - start).to(self.device)
            target = out[offsets[i] : offsets[i + 1], j]
            target.copy_(torch.cat(parts).index_select(0, rows))
            if normaliser is not None:
                normaliser.apply_layer_(target, j)
        self.rows_read += int(sum(sizes))
        return out
