"""Bytes on disk and decode rate of each storage layout, on a store's own activations.

The first ``--chunks`` chunks of a harvested store are written again in the default layout
(one shuffle + zstd frame per chunk and layer) and in the zstd-gpu layout (the same chain
per frame of at most 1 MiB, a zarr shard per chunk), then for each: bytes against raw bf16, and the
rate of decoding every chunk (zarr on the CPU, same threads). With ``--device cuda`` the
zstd-gpu copy is also decoded by nvCOMP on the device (``decode: gpu``), after checking it
gives the CPU's bytes exactly.

    python bench/storage_layout.py --harvest manifests/harvest/smollm2-wiki-cpu-large.yaml
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import device_name, load_average, sync

from pipeline.harvest.models import resolve_device
from pipeline.manifests.harvest import StorageSpec, load_harvest_manifest
from pipeline.paths import StorePaths
from pipeline.store.format import from_storage_numpy, gpu_frame_rows
from pipeline.store.reader import ActivationStore
from pipeline.store.writer import StoreWriter, write_completion
from pipeline.training.readers import ChunkDecoder, gpu_decode
from stages import harvest

LAYOUTS = ("zstd", "zstd-gpu")


def rewrite(source: ActivationStore, root: Path, codec: str, chunks: int) -> ActivationStore:
    """The first ``chunks`` chunks of ``source``, every hook, in layout ``codec``."""
    storage = source.record["storage"] | {"codec": codec, "chunk_tokens": source.chunk_tokens}
    spec = StorageSpec.model_validate(storage)
    n_tokens = min(source.n_tokens, chunks * source.chunk_tokens)
    paths = StorePaths(root / codec)
    writer = StoreWriter(paths, source.hook_names, n_tokens, source.d_model, spec)
    for block in range(writer.n_blocks):
        start, stop = writer.block_rows(block)
        stored = from_storage_numpy(source.read_stored(start, stop), source.dtype)
        writer.write_block(block, stored, torch.ones(stop - start, dtype=torch.bool))
    done = writer.finalize(0.0)
    write_completion(paths.completion, done["record"])
    return ActivationStore(paths.root)


def chunk_bytes(store: ActivationStore) -> int:
    return sum(sum(files.values()) for files in store.record["chunk_files"].values())


def decode_rate(decoder: ChunkDecoder, device: torch.device) -> float:
    """Rows per second decoding every chunk, all layers, one chunk per call."""
    started = time.perf_counter()
    rows = sum(decoder.decode([c], None).shape[0] for c in range(decoder.store.n_chunks))
    sync(device)
    return rows / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--harvest", default="manifests/harvest/smollm2-wiki-cpu-large.yaml")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = resolve_device(args.device)
    load_before = load_average()
    source = ActivationStore(harvest.run(load_harvest_manifest(args.harvest)).path)
    figures: dict[str, object] = {
        "device": device_name(device),
        "source_store": source.key,
        "layers": source.n_layers,
        "d_model": source.d_model,
        "chunk_tokens": source.chunk_tokens,
        "gpu_frame_rows": gpu_frame_rows(source.chunk_tokens, source.d_model * 2),
    }
    with tempfile.TemporaryDirectory(prefix="layouts-") as tmp:
        stores = {codec: rewrite(source, Path(tmp), codec, args.chunks) for codec in LAYOUTS}
        n_tokens = stores["zstd"].n_tokens
        raw = n_tokens * source.n_layers * source.d_model * 2
        figures["tokens"] = n_tokens
        figures["raw_bf16_bytes"] = raw
        for codec, store in stores.items():
            figures[f"{codec}_bytes"] = chunk_bytes(store)
            figures[f"{codec}_compression_vs_raw_bf16"] = raw / chunk_bytes(store)
        figures["zstd_gpu_bytes_vs_zstd"] = chunk_bytes(stores["zstd-gpu"]) / chunk_bytes(
            stores["zstd"]
        )
        layers = list(range(source.n_layers))
        rows = np.arange(n_tokens)
        decoders: dict[str, ChunkDecoder] = {
            f"{codec}_cpu": ChunkDecoder(store, layers, rows, args.workers)
            for codec, store in stores.items()
        }
        if device.type == "cuda":
            gpu = gpu_decode.GpuChunkDecoder(
                stores["zstd-gpu"],
                layers,
                rows,
                args.workers,
                device=device,
                frames=gpu_decode.frame_decoder_for(device),
            )
            for chunk in range(stores["zstd-gpu"].n_chunks):  # bit for bit, before timing
                want = decoders["zstd-gpu_cpu"].decode([chunk], None)
                if not torch.equal(gpu.decode([chunk], None).cpu(), want):
                    raise SystemExit(f"nvCOMP decode of chunk {chunk} differs from zarr's")
            decoders["zstd-gpu_gpu"] = gpu
        samples: dict[str, list[float]] = {}
        for _ in range(args.rounds):  # interleaved, medians: a shared machine drifts
            for name, decoder in decoders.items():
                samples.setdefault(name, []).append(decode_rate(decoder, device))
        for name, values in samples.items():
            figures[f"{name}_decode_rows_per_s"] = statistics.median(values)
        figures["zstd_gpu_vs_zstd_cpu_decode"] = (
            figures["zstd-gpu_cpu_decode_rows_per_s"] / figures["zstd_cpu_decode_rows_per_s"]
        )
        if "zstd-gpu_gpu" in decoders:
            figures["gpu_decode_vs_cpu_decode"] = (
                figures["zstd-gpu_gpu_decode_rows_per_s"] / figures["zstd_cpu_decode_rows_per_s"]
            )
        for decoder in decoders.values():
            decoder.close()
    figures |= {"load_average_before": load_before, "load_average_after": load_average()}
    width = max(map(len, figures))
    for name, value in figures.items():
        shown = f"{value:,.3f}" if isinstance(value, float) else str(value)
        print(f"{name:<{width}}  {shown}")
    out = Path(args.out or f"bench/results/storage_layout-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
