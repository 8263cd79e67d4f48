"""Benchmark the train path, all ratios measured in one run on one machine.

1. loader tokens/s (stream mode: whole compressed chunks, decoded in threads, shuffled)
   vs a raw sequential read of the same rows from an uncompressed np.memmap;
2. training steps/s fed from the store (resident, and stream) vs fed from batches
   already on the device (target >= 0.9: the loader never starves the device);
3. fmxcoder (shared layer basis, rank R) step time vs the dense crosscoder at equal m.

    python bench/train.py --harvest manifests/harvest/smollm2-wiki-smoke.yaml
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
from common import device_name, sync

from pipeline.coders import build_coder, coder_config_from_dict
from pipeline.harvest_manifest import load_harvest_manifest
from pipeline.loader import ActivationLoader
from pipeline.models import resolve_device
from pipeline.store import ActivationStore
from stages import harvest


def raw_memmap_rows_per_second(store: ActivationStore, layers: list[int], rows: int) -> float:
    """Write the rows uncompressed once, then time a sequential memmap read of them."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "raw.u16"
        shape = (rows, len(layers), store.d_model)
        out = np.memmap(path, dtype=np.uint16, mode="w+", shape=shape)
        for chunk in range(store.n_chunks):
            start, stop = store.chunk_rows(chunk)
            if start >= rows:
                break
            stop = min(stop, rows)
            out[start:stop] = store.read_stored(start, stop, layers)
        out.flush()
        del out
        data = np.memmap(path, dtype=np.uint16, mode="r", shape=shape)
        started = time.perf_counter()
        block = 4096
        total = 0
        for start in range(0, rows, block):
            total += int(np.array(data[start : start + block])[:, 0, 0].sum() >= 0)
        return rows / (time.perf_counter() - started)


def loader_tokens_per_second(loader: ActivationLoader) -> float:
    started = time.perf_counter()
    seen = sum(batch.shape[0] for batch in loader.epoch(0))
    sync(loader.device)
    return seen / (time.perf_counter() - started)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--harvest", default="manifests/harvest/smollm2-wiki-smoke.yaml")
    parser.add_argument("--layers", default="2,5,8,11,14,17,20,23,26,29")
    parser.add_argument("--latents", type=int, default=1024)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--rank", type=int, default=3)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    device = resolve_device(args.device)
    result = harvest.run(load_harvest_manifest(args.harvest))
    store = ActivationStore(result.path)
    layers = [int(x) for x in args.layers.split(",")] if args.layers != "all" else None
    layers = layers or list(range(store.n_layers))

    stream = ActivationLoader(
        store, batch_size=args.batch, layers=layers, split="all", mode="stream", device=device
    )
    raw_rate = raw_memmap_rows_per_second(store, layers, stream.n_tokens)
    stream_rate = loader_tokens_per_second(stream)
    resident = ActivationLoader(
        store, batch_size=args.batch, layers=layers, split="train", mode="resident", device=device
    )
    first_epoch = loader_tokens_per_second(resident)
    warm_epoch = loader_tokens_per_second(resident)

    common = {"n_layers": len(layers), "d_model": store.d_model, "n_latents": args.latents}
    common |= {"activation": "topk", "k": args.k}
    dense = build_coder(coder_config_from_dict({"kind": "crosscoder", **common})).to(device)
    fmx_config = {
        "kind": "fmxcoder",
        "encoder_factorization": "shared_basis",
        "decoder_factorization": "shared_basis",
        "rank": args.rank,
        **common,
    }
    fmx = build_coder(coder_config_from_dict(fmx_config)).to(device)

    def store_batches():
        epoch = 0
        while True:
            yield from resident.epoch(epoch)
            epoch += 1

    synthetic = [
        torch.randn(args.batch, len(layers), store.d_model, device=device) for _ in range(8)
    ]

    def device_batches():
        while True:
            yield from synthetic

    def stream_batches():
        epoch = 0
        while True:
            yield from stream.epoch(epoch)
            epoch += 1

    # Interleaved rounds, medians: a shared machine drifts between measurements.
    rates: dict[str, list[float]] = {}
    feeds = {"store": store_batches, "stream": stream_batches, "device": device_batches}
    for _ in range(args.rounds):
        for coder_name, coder in (("crosscoder", dense), ("fmxcoder", fmx)):
            for feed, batches in feeds.items():
                rate = steps_per_second(coder, batches(), args.steps, device)
                rates.setdefault(f"{coder_name}_{feed}", []).append(rate)
    median = {name: statistics.median(values) for name, values in rates.items()}
    dense_store, dense_device = median["crosscoder_store"], median["crosscoder_device"]
    fmx_store, fmx_device = median["fmxcoder_store"], median["fmxcoder_device"]

    figures = {
        "device": device_name(device),
        "torch": torch.__version__,
        "store": store.key,
        "layers": len(layers),
        "d_model": store.d_model,
        "batch": args.batch,
        "latents": args.latents,
        "rank": args.rank,
        "raw_memmap_rows_per_s": raw_rate,
        "stream_loader_rows_per_s": stream_rate,
        "stream_vs_raw": stream_rate / raw_rate,
        "resident_first_epoch_rows_per_s": first_epoch,
        "resident_warm_epoch_rows_per_s": warm_epoch,
        "crosscoder_steps_per_s_from_store": dense_store,
        "crosscoder_steps_per_s_from_device": dense_device,
        "crosscoder_store_vs_device": dense_store / dense_device,
        "crosscoder_steps_per_s_from_stream": median["crosscoder_stream"],
        "crosscoder_stream_vs_device": median["crosscoder_stream"] / dense_device,
        "fmxcoder_steps_per_s_from_store": fmx_store,
        "fmxcoder_steps_per_s_from_device": fmx_device,
        "fmxcoder_store_vs_device": fmx_store / fmx_device,
        "fmxcoder_steps_per_s_from_stream": median["fmxcoder_stream"],
        "fmxcoder_stream_vs_device": median["fmxcoder_stream"] / fmx_device,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "fmxcoder_step_time_vs_crosscoder": dense_device / fmx_device,
        "crosscoder_parameters": dense.num_parameters(),
        "fmxcoder_parameters": fmx.num_parameters(),
    }
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
