"""Benchmark the train path: every loader mode against its ceilings, in one run.

1. loader rows/s per mode (resident, memmap, stream) on the training split, against
   (a) decoding the same chunks and nothing else (the store's own reader, same threads) and
   (b) a raw sequential read of the decoded uint16 file (the memmap mode's own file);
2. shuffle quality: distinct documents per batch, against the expectation for a perfect
   shuffle (stream's window, and the old 4-chunk window for comparison);
3. training steps/s fed by each mode vs fed by batches already on the device, for the
   dense crosscoder and the fmxcoder (target >= 0.95: the loader never starves the device).
   Each loader-fed sample is bracketed by two device-fed ones (ratio to their mean, median
   over rounds), and stream is timed over a whole epoch, which holds exactly one decode of
   the split, as in training. ``<coder>_<mode>_work_per_step`` is the mode's own work for
   one batch (resident, memmap: a batch at the mode's rows/s; stream: the split's
   decode-only time over the epoch's steps) as a share of a device-fed step: on a CPU that
   work runs on the step's own cores, so ``1 / (1 + share)`` is what it alone would cost.
   ``--inline-ab`` also times resident and memmap gathering in the step's own thread
   (``<coder>_<mode>_inline_vs_device``): the threads' default is checked, not assumed.
   ``..._vs_device_round_sd`` is the ratio's spread over rounds (one sample's noise);
4. stream under torchrun: the rows each of 2, 4 and 8 ranks decodes per epoch, as a share
   of one process's (from the epoch's plan; each rank decodes its strata's segments);
5. with ``--gpu-decode`` (CUDA, a store harvested with ``storage: {codec: zstd-gpu}``): the
   nvCOMP decode-only rate against zarr's on the CPU, the stream mode on ``decode: gpu``
   against the stream mode, and its step ratios (bench/gpu_loader.sh runs this).

Ratios, not absolute speeds: the machine may be shared (load averages are recorded).

    python bench/train.py --harvest manifests/harvest/smollm2-wiki-cpu-large.yaml
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from common import device_name, load_average, sync

from pipeline.coders import build_coder, coder_config_from_dict
from pipeline.harvest.models import resolve_device
from pipeline.manifests.harvest import load_harvest_manifest
from pipeline.store.reader import ActivationStore
from pipeline.training.loader import ActivationLoader
from pipeline.training.readers.base import bits_to_float32
from pipeline.training.readers.stream import StreamReader
from stages import harvest

MODES = ("resident", "memmap", "stream")


def decode_only_rows_per_second(loader: ActivationLoader) -> float:
    """Every chunk of the split decoded (storage dtype), nothing else: the codec's ceiling."""
    chunks = [c for c in range(loader.store.n_chunks) if len(loader.decoder.chunk_rows[c])]
    started = time.perf_counter()
    rows = sum(loader.decoder.decode([chunk], None).shape[0] for chunk in chunks)
    sync(loader.device)  # decode: gpu queues its last steps on the device
    return rows / (time.perf_counter() - started)


def raw_rows_per_second(data: np.memmap, block: int = 4096) -> float:
    """A sequential read of the decoded file into fresh arrays (after one warming pass)."""
    for start in range(0, data.shape[0], block):
        np.array(data[start : start + block])
    started = time.perf_counter()
    for start in range(0, data.shape[0], block):
        np.array(data[start : start + block])
    return data.shape[0] / (time.perf_counter() - started)


def shuffled_gather_rows_per_second(data: np.memmap, batch: int, dtype: str) -> float:
    """Sorted random-row gathers widened to float32, single thread: the memmap mode's work."""
    order = np.random.default_rng(0).permutation(data.shape[0])
    started = time.perf_counter()
    for start in range(0, order.size, batch):
        bits_to_float32(data[np.sort(order[start : start + batch])], dtype)
    return data.shape[0] / (time.perf_counter() - started)


def epoch_rows_per_second(loader: ActivationLoader, epoch: int) -> float:
    started = time.perf_counter()
    seen = sum(batch.shape[0] for batch in loader.epoch(epoch))
    sync(loader.device)
    return seen / (time.perf_counter() - started)


def fresh_stream_rows_per_second(make, epochs: int) -> float:
    each = make()
    started = time.perf_counter()
    seen = sum(batch.shape[0] for epoch in range(epochs) for batch in each.epoch(epoch))
    sync(each.device)
    rate = seen / (time.perf_counter() - started)
    each.close()
    return rate


def rank_decode_share(loader: ActivationLoader, world: int) -> float:
    """Rows a torchrun rank decodes in a stream epoch (``stream_strata = world``), as a share
    of what one process decodes: from the epoch's plan, nothing decoded."""
    reader = loader.reader
    decoded = []
    for rank in range(world):
        ranked = StreamReader(
            loader.decoder,
            loader.normaliser,
            batch_size=loader.batch_size,
            seed=0,
            device=loader.device,
            window_rows=reader.window_rows,
            share=(rank, world),
        )
        segments = ranked.segments(0, loader.n_tokens)
        decoded.append(sum(loader.decoder.n_rows(ranked.segment_chunks(s)[0]) for s in segments))
        ranked.close()
    return statistics.mean(decoded) / loader.n_tokens


def row_documents(store: ActivationStore, loader: ActivationLoader) -> dict[bytes, int]:
    """Key (bf16 bits of 8 coordinates of the last layer) -> document id, for the split."""
    tokens = store.tokens(columns=["doc_id"])["doc_id"].to_numpy()
    layer = loader.layers[-1]
    keys: dict[bytes, int] = {}
    for chunk, rows in enumerate(loader.decoder.chunk_rows):
        if len(rows):
            start, stop = store.chunk_rows(chunk)
            values = store.arrays[layer][start:stop][rows - start, :8]
            keys.update(zip(map(bytes, values), tokens[rows].tolist(), strict=True))
    return keys


def distinct_documents(loader: ActivationLoader, keys: dict[bytes, int], batches: int) -> float:
    """Mean distinct documents in the first ``batches`` full batches of epoch 0."""
    counts = []
    for batch in loader.epoch(0):
        if len(counts) == batches or batch.shape[0] < loader.batch_size:
            break
        raw = loader.normaliser.invert(batch)[:, -1, :8].to(torch.bfloat16).cpu()
        bits = raw.view(torch.int16).numpy().view(np.uint16)
        counts.append(len({keys.get(bytes(row), -1) for row in bits}))
    return float(np.mean(counts))


def perfect_shuffle_documents(keys: dict[bytes, int], batch: int) -> float:
    """Expected distinct documents in ``batch`` rows drawn uniformly from the split."""
    sizes = np.bincount(np.fromiter(keys.values(), dtype=np.int64)).astype(np.float64)
    sizes = sizes[sizes > 0]
    total = sizes.sum()
    return float(np.sum(1 - (1 - sizes / total) ** batch))


def steps_per_second(coder, batches, steps: int, device: torch.device) -> float:
    optimizer = torch.optim.Adam(coder.parameters(), lr=1e-4)
    iterator = iter(batches)
    for step in range(steps + 2):
        if step == 2:  # warm-up steps excluded
            sync(device)
            started = time.perf_counter()
        batch = next(iterator)
        loss = coder.training_loss(batch, step, steps).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    return steps / (time.perf_counter() - started)


def endless(loader: ActivationLoader):
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--harvest", default="manifests/harvest/smollm2-wiki-cpu-large.yaml")
    parser.add_argument("--layers", default="all", help="store hook indices, or 'all'")
    parser.add_argument("--latents", type=int, default=1024)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2, help="loader decode threads")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (medians)")
    parser.add_argument("--quality-batches", type=int, default=20)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--gpu-decode", action="store_true", help="also the stream mode on decode: gpu"
    )
    parser.add_argument(
        "--inline-ab",
        action="store_true",
        help="also time resident and memmap gathering inline, in the step's thread",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    device = resolve_device(args.device)
    load_before = load_average()
    store = ActivationStore(harvest.run(load_harvest_manifest(args.harvest)).path)
    layers = None if args.layers == "all" else [int(x) for x in args.layers.split(",")]

    def loader(mode: str, **extra) -> ActivationLoader:
        return ActivationLoader(
            store,
            batch_size=args.batch,
            layers=layers,
            split="train",
            mode=mode,
            device=device,
            workers=args.workers,
            **extra,
        )

    loaders = {mode: loader(mode) for mode in MODES}
    stream = loaders["stream"]
    memmap_file = loaders["memmap"].reader.file
    data = memmap_file.open()
    figures: dict[str, object] = {
        "device": device_name(device),
        "torch": torch.__version__,
        "store": store.key,
        "layers": len(stream.layers),
        "d_model": store.d_model,
        "chunk_tokens": store.chunk_tokens,
        "train_tokens": stream.n_tokens,
        "batch": args.batch,
        "workers": args.workers,
        "stream_shuffle_window_tokens": min(stream.describe()["window_rows"], stream.n_tokens),
    }
    for each in loaders.values():  # first epochs: resident decodes, memmap pages in
        figures[f"{each.mode}_first_epoch_rows_per_s"] = epoch_rows_per_second(each, 0)
    measures = {
        "decode_only": lambda _: decode_only_rows_per_second(stream),
        "raw_memmap_sequential": lambda _: raw_rows_per_second(data),
        "raw_memmap_shuffled_gather": lambda _: shuffled_gather_rows_per_second(
            data, args.batch, store.dtype
        ),
    }
    for mode in ("resident", "memmap"):
        measures[mode] = lambda epoch, each=loaders[mode]: epoch_rows_per_second(each, epoch)
    # stream: a fresh loader per sample, two epochs timed together, so its look-ahead decode
    # overlaps only its own consumption (never the other measurements)
    measures["stream"] = lambda _: fresh_stream_rows_per_second(lambda: loader("stream"), 2)
    extra_modes: tuple[str, ...] = ()
    if args.gpu_decode:
        loaders["stream_gpu_decode"] = loader("stream", decode="gpu")
        gpu_stream = loaders["stream_gpu_decode"]
        measures["gpu_decode_only"] = lambda _: decode_only_rows_per_second(gpu_stream)
        measures["stream_gpu_decode"] = lambda _: fresh_stream_rows_per_second(
            lambda: loader("stream", decode="gpu"), 2
        )
        extra_modes = ("stream_gpu_decode",)
    samples: dict[str, list[float]] = {}
    for round_ in range(args.rounds):  # interleaved, medians: a shared machine drifts
        for name, measure in measures.items():
            samples.setdefault(name, []).append(measure(round_ + 1))
    rate = {name: statistics.median(values) for name, values in samples.items()}
    for name, value in rate.items():
        figures[f"{name}_rows_per_s"] = value
    decode_seconds = stream.n_tokens / rate["decode_only"]  # one epoch's decode, all threads
    for mode in MODES + extra_modes:
        figures[f"{mode}_vs_decode_only"] = rate[mode] / rate["decode_only"]
        figures[f"{mode}_vs_raw"] = rate[mode] / rate["raw_memmap_sequential"]
    if args.gpu_decode:
        figures["gpu_decode_vs_cpu_decode"] = rate["gpu_decode_only"] / rate["decode_only"]
        figures["stream_gpu_decode_vs_stream"] = rate["stream_gpu_decode"] / rate["stream"]

    for world in (2, 4, 8):  # torchrun: each rank decodes only its strata's segments
        figures[f"stream_rows_decoded_per_rank_{world}_ranks"] = rank_decode_share(stream, world)

    keys = row_documents(store, stream)
    perfect = perfect_shuffle_documents(keys, args.batch)
    four_chunks = loader("stream", buffer_chunks=4)
    figures["perfect_shuffle_documents_per_batch"] = perfect
    for name, each in (*loaders.items(), ("stream_4_chunks", four_chunks)):
        distinct = distinct_documents(each, keys, args.quality_batches)
        figures[f"{name}_documents_per_batch"] = distinct
        figures[f"{name}_shuffle_quality"] = distinct / perfect
    four_chunks.close()

    common = {"n_layers": len(stream.layers), "d_model": store.d_model}
    common |= {"n_latents": args.latents, "activation": "topk", "k": args.k}
    dense = build_coder(coder_config_from_dict({"kind": "crosscoder", **common})).to(device)
    fmx_config = {"kind": "fmxcoder", "rank": args.rank, **common}  # the default reading:
    fmx_config |= {"encoder_factorization": "per_latent", "decoder_factorization": "per_latent"}
    fmx_config |= {"masking_probability": 0.25, "masking_rescale": True}
    fmx_config |= {"collapse_coefficient": 0.1}  # per_latent rank 2 + layer masking
    fmx = build_coder(coder_config_from_dict(fmx_config)).to(device)
    synthetic = [
        torch.randn(args.batch, len(stream.layers), store.d_model, device=device) for _ in range(8)
    ]

    def device_batches():
        while True:
            yield from synthetic

    feeds = {mode: (lambda each=each: endless(each)) for mode, each in loaders.items()}
    inline_modes = ("resident_inline", "memmap_inline") if args.inline_ab else ()
    for name in inline_modes:  # the same batches, gathered in the consumer's thread
        inline = loader(name.removesuffix("_inline"), gather_ahead=0)
        loaders[name] = inline
        feeds[name] = lambda each=inline: endless(each)
    # a stream epoch decodes the split once, overlapped with the steps: its rate is only
    # meaningful over a whole epoch (10 steps would sit beside a whole epoch's decode)
    epoch_steps = -(-stream.n_tokens // args.batch)
    figures["stream_steps_timed"] = max(args.steps, epoch_steps)
    ratios: dict[str, list[float]] = {}
    on_device: dict[str, list[float]] = {}
    for _ in range(args.rounds):  # interleaved, medians: a shared machine drifts
        for coder_name, coder in (("crosscoder", dense), ("fmxcoder", fmx)):
            before = steps_per_second(coder, device_batches(), args.steps, device)
            on_device.setdefault(coder_name, []).append(before)
            for feed, batches in feeds.items():  # each bracketed by device-fed neighbours
                steps = figures["stream_steps_timed"] if feed.startswith("stream") else args.steps
                fed = steps_per_second(coder, batches(), steps, device)
                after = steps_per_second(coder, device_batches(), args.steps, device)
                on_device[coder_name].append(after)
                ratios.setdefault(f"{coder_name}_{feed}", []).append(fed / ((before + after) / 2))
                before = after
    for coder_name in ("crosscoder", "fmxcoder"):
        device_rate = statistics.median(on_device[coder_name])
        figures[f"{coder_name}_steps_per_s_from_device"] = device_rate
        for mode in MODES + extra_modes + inline_modes:
            samples = ratios[f"{coder_name}_{mode}"]
            figures[f"{coder_name}_{mode}_vs_device"] = statistics.median(samples)
            # one round's spread: how far apart two settings must be to differ
            spread = statistics.stdev(samples) if len(samples) > 1 else 0.0
            figures[f"{coder_name}_{mode}_vs_device_round_sd"] = spread
        for mode in MODES:  # the loader's own work per batch, as a share of a device-fed step
            # stream: its decode of the split spread over the epoch's steps; the others: a
            # batch at the mode's own rate
            work = (
                decode_seconds / epoch_steps
                if mode == "stream"
                else args.batch / figures[f"{mode}_rows_per_s"]
            )
            figures[f"{coder_name}_{mode}_work_per_step"] = work * device_rate
    figures |= {
        "stream_vs_decode_only": figures["stream_vs_decode_only"],
        "memmap_vs_raw": figures["memmap_vs_raw"],
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }
    for each in loaders.values():
        each.close()

    width = max(map(len, figures))
    for name, value in figures.items():
        shown = f"{value:,.3f}" if isinstance(value, float) else str(value)
        print(f"{name:<{width}}  {shown}")
    out = Path(args.out or f"bench/results/train-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
