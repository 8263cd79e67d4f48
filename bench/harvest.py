"""Benchmark the harvest path on the real SmolLM2-135M, all ratios measured in one run.

1. bare forward tokens/s: the same hooks, batches and early stop as the harvest,
   activations copied into a throwaway buffer, nothing stored;
2. full harvest tokens/s (bf16, shuffle + zstd(1) + crc32c, block markers, statistics)
   -> ratio to (1); target >= 0.9: storing costs at most 10% of the forward;
3. bytes on disk per token-layer vs raw fp32 (4 d B) and raw bf16 (2 d B), i.e. the
   compression ratio (target 1.26-1.47x over raw bf16, see ../shared/STORAGE.md);
4. the naive baseline of one forward per hooked layer (SAELens runs one hook per run):
   full forwards, and forwards stopped after the layer, each as a ratio to (1).

(1) and (2) run in interleaved rounds (bare over a slice, then a harvest of as many
tokens with another tokenisation seed, so the stores hold different text) so both see
the same load on a shared machine; (4) is sandwiched between two bare runs on its
tokens. Harvest tokens/s counts the block loop (forward + storage), not model loading.

On a CPU shared with other jobs, torch's default of one OpenMP thread per core slows
4-10x and swings from batch to batch (busy threads stall at every barrier); ``--threads
1`` gives stable ratios there. Record the load averages with the figures (the JSON does).

    python bench/harvest.py                      # 16384 tokens, 6 layers of 30
    python bench/harvest.py --layers all --naive-tokens 512 \
        --out bench/results/harvest-cpu-all-layers.json
    python bench/harvest.py --threads 1 --out bench/results/harvest-cpu-1thread.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numcodecs
import numpy as np
import torch
import zarr
from common import device_name, load_average, sync

from pipeline.harvest.models import ActivationModel, load_model, resolve_device
from pipeline.harvest.text_sources import load_documents
from pipeline.harvest.windows import build_windows
from pipeline.manifests.harvest import HarvestManifest
from pipeline.store.format import TORCH_STORAGE
from pipeline.store.reader import ActivationStore
from stages import harvest

N_MODEL_LAYERS = 30  # SmolLM2-135M


def parse_layers(value: str) -> list[int] | str:
    """'all', a count of evenly spaced layers ('6'), or a list ('0,7,15,29')."""
    if value == "all":
        return "all"
    if "," in value:
        return [int(x) for x in value.split(",")]
    count = int(value)
    return sorted(set(np.linspace(0, N_MODEL_LAYERS - 1, count).round().astype(int).tolist()))


def round_manifest(args, layers, tokens: int, seed: int) -> HarvestManifest:
    return HarvestManifest.model_validate(
        {
            "model": {"source": "packaged", "name": "smollm2-135m"},
            "text": {"source": "wiki_summaries", "languages": ["en", "fr", "es"]},
            "tokenization": {"context_length": args.context, "num_tokens": tokens, "seed": seed},
            "hooks": {"layers": layers},
            "storage": {
                "dtype": "bfloat16",
                "codec": "zstd",
                "level": 1,
                "shuffle": True,
                "checksum": True,
                "chunk_tokens": args.chunk_tokens,
            },
            "run": {"batch_size": args.batch, "device": args.device, "progress": False},
        }
    )


def bare_forward_seconds(
    model: ActivationModel, windows: np.ndarray, hook_names: list[str], batch: int, dtype: str
) -> float:
    """The harvest's forward (same hooks, same early stop, same batches), nothing stored."""
    ctx = windows.shape[1]
    out = torch.empty(
        (batch, ctx, len(hook_names), model.d_model),
        dtype=TORCH_STORAGE[dtype],
        device=model.device,
    )
    sync(model.device)
    started = time.perf_counter()
    for w in range(0, len(windows), batch):
        tokens = torch.from_numpy(windows[w : w + batch])
        model.capture(tokens, hook_names, out[: len(tokens)])
    sync(model.device)
    return time.perf_counter() - started


@torch.inference_mode()
def naive_seconds(
    model: ActivationModel,
    windows: np.ndarray,
    hook_names: list[str],
    batch: int,
    dtype: str,
    stop_early: bool,
) -> float:
    """One forward per hooked layer: full forwards, or forwards stopped after the layer."""
    ctx = windows.shape[1]
    sink = torch.empty((batch, ctx, model.d_model), dtype=TORCH_STORAGE[dtype], device=model.device)

    def keep(activation: torch.Tensor, hook: object) -> torch.Tensor:
        sink[: activation.shape[0]].copy_(activation)
        return activation

    sync(model.device)
    started = time.perf_counter()
    for name in hook_names:
        for w in range(0, len(windows), batch):
            tokens = torch.from_numpy(windows[w : w + batch])
            if stop_early:
                model.capture(tokens, [name], sink[: len(tokens), :, None])
            else:
                model.bridge.run_with_hooks(tokens.to(model.device), fwd_hooks=[(name, keep)])
    sync(model.device)
    return time.perf_counter() - started


def chunk_bytes(store: ActivationStore) -> int:
    return sum(sum(files.values()) for files in store.record["chunk_files"].values())


def print_table(figures: dict) -> None:
    bare = figures["bare_forward_tokens_per_s"]
    print(f"\n{'path':<38}{'tok/s':>10}{'vs bare':>9}")
    for label, key in [
        ("bare forward (hooks, early stop)", "bare_forward_tokens_per_s"),
        ("harvest (zstd+shuffle+crc32c)", "harvest_tokens_per_s"),
        (f"naive: {figures['layers']} full forwards", "naive_full_tokens_per_s"),
        (f"naive: {figures['layers']} stopped forwards", "naive_stopped_tokens_per_s"),
    ]:
        reference = figures["naive_bare_tokens_per_s"] if "naive" in key else bare
        print(f"{label:<38}{figures[key]:>10.1f}{figures[key] / reference:>9.3f}")
    print(f"\n{'bytes per token-layer':<38}{'B':>10}{'ratio':>9}")
    stored = figures["bytes_per_token_layer"]
    for label, value in [
        ("raw fp32", figures["raw_fp32_bytes_per_token_layer"]),
        ("raw bf16", figures["raw_bf16_bytes_per_token_layer"]),
        ("stored (bf16, shuffle+zstd(1))", stored),
    ]:
        print(f"{label:<38}{value:>10.1f}{value / stored:>9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384, help="harvested (and bare) tokens")
    parser.add_argument("--layers", default="6", help="'all', a count ('6'), or '0,7,15,29'")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved bare/harvest rounds")
    parser.add_argument("--chunk-tokens", type=int, default=2048, help="rows per block/chunk")
    parser.add_argument("--naive-tokens", type=int, default=1024, help="tokens for baseline (4)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    per_round = args.tokens // args.rounds
    if per_round % args.context or per_round % args.chunk_tokens:
        parser.error("--tokens / --rounds must be a multiple of --context and --chunk-tokens")

    layers = parse_layers(args.layers)
    device = resolve_device(args.device)
    load_before = load_average()
    started_all = time.perf_counter()
    model = load_model(round_manifest(args, layers, per_round, 0).model, args.device)
    dtype = "bfloat16"
    documents = None

    bare_s, harvest_s, stored, store_total, hook_names = [], [], 0, 0, []
    with tempfile.TemporaryDirectory(prefix="fmx-bench-") as cache_root:
        for r in range(args.rounds):
            manifest = round_manifest(args, layers, per_round, seed=r)
            hook_names = model.hook_names(manifest.hooks)
            documents = documents or load_documents(manifest.text)
            windows = build_windows(documents, model.tokenizer, manifest.tokenization).token_ids
            if r == 0:  # warm-up batch, untimed
                bare_forward_seconds(model, windows[: args.batch], hook_names, args.batch, dtype)
            bare_s.append(bare_forward_seconds(model, windows, hook_names, args.batch, dtype))
            result = harvest.run(manifest, Path(cache_root))
            harvest_s.append(per_round / result.tokens_per_second)
            store = ActivationStore(result.path, verify=True)
            stored += chunk_bytes(store)
            store_total += store.size_on_disk()
            print(
                f"round {r}: bare {per_round / bare_s[-1]:.1f} tok/s, harvest "
                f"{result.tokens_per_second:.1f} tok/s, ratio {bare_s[-1] / harvest_s[-1]:.3f}",
                flush=True,
            )

    naive_windows = windows[: max(1, args.naive_tokens // args.context)]
    naive_bare = [bare_forward_seconds(model, naive_windows, hook_names, args.batch, dtype)]
    naive_full = naive_seconds(model, naive_windows, hook_names, args.batch, dtype, False)
    naive_stopped = naive_seconds(model, naive_windows, hook_names, args.batch, dtype, True)
    naive_bare.append(bare_forward_seconds(model, naive_windows, hook_names, args.batch, dtype))
    load_after = load_average()

    total = per_round * args.rounds
    naive_tokens = int(naive_windows.size)
    bare = total / sum(bare_s)
    harvested = total / sum(harvest_s)
    round_ratios = [b / h for b, h in zip(bare_s, harvest_s, strict=True)]
    naive_bare_rate = naive_tokens / statistics.mean(naive_bare)
    token_layers = total * len(hook_names)
    per_token_layer = stored / token_layers
    raw_fp32, raw_bf16 = 4 * model.d_model, 2 * model.d_model
    figures = {
        "device": device_name(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "host": platform.node(),
        "shared_machine_note": "other processes shared the CPU; see load averages",
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "wall_seconds": time.perf_counter() - started_all,
        "tokens": total,
        "rounds": args.rounds,
        "layers": len(hook_names),
        "hooks": hook_names,
        "context": args.context,
        "batch": args.batch,
        "chunk_tokens": args.chunk_tokens,
        "storage": "bf16 bits, byte-shuffle + zstd(1) + crc32c",
        "bare_forward_tokens_per_s": bare,
        "harvest_tokens_per_s": harvested,
        "harvest_vs_bare_forward": harvested / bare,
        "harvest_vs_bare_forward_per_round": round_ratios,
        "harvest_vs_bare_forward_median_round": statistics.median(round_ratios),
        "bytes_per_token_layer": per_token_layer,
        "raw_fp32_bytes_per_token_layer": raw_fp32,
        "raw_bf16_bytes_per_token_layer": raw_bf16,
        "compression_vs_raw_bf16": raw_bf16 / per_token_layer,
        "compression_vs_raw_fp32": raw_fp32 / per_token_layer,
        "store_bytes_total": store_total,
        "store_bytes_per_token_layer_with_tables": store_total / token_layers,
        "naive_tokens": naive_tokens,
        "naive_bare_tokens_per_s": naive_bare_rate,
        "naive_full_tokens_per_s": naive_tokens / naive_full,
        "naive_full_vs_bare_forward": naive_tokens / naive_full / naive_bare_rate,
        "naive_stopped_tokens_per_s": naive_tokens / naive_stopped,
        "naive_stopped_vs_bare_forward": naive_tokens / naive_stopped / naive_bare_rate,
    }
    width = max(map(len, figures))
    for name, value in figures.items():
        if isinstance(value, float):
            shown = f"{value:,.3f}"
        elif isinstance(value, list) and value and isinstance(value[0], float):
            shown = ", ".join(f"{v:.3f}" for v in value)
        else:
            shown = str(value)
        if name != "hooks":
            print(f"{name:<{width}}  {shown}")
    print_table(figures)
    suffix = "-all-layers" if layers == "all" else ""
    out = Path(args.out or f"bench/results/harvest-{device.type}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
