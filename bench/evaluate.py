"""Benchmark the evaluate stage: held-out tokens/s and peak memory while streaming the store.

1. the core pass alone (every metric accumulator of every variant, one read of the split);
2. the whole stage (pass + probes + sampled latents + plots + HTML; splice with --splice);
3. peak memory: the process's peak RSS above its level before evaluating
   (``resource.getrusage``) and the peak of Python-tracked allocations (``tracemalloc``:
   numpy yes, torch no), against the size of the decoded held-out split and of one chunk.
   A streaming evaluation stays near one chunk plus the accumulators, whatever the split.

The default store is a tiny random model (8 layers, d_model 256) over real text with half
the documents held out, so the split is many chunks; the coders are freshly initialised
(evaluation cost does not depend on training).

    python bench/evaluate.py
    python bench/evaluate.py --harvest manifests/harvest/smollm2-wiki-smoke.yaml --splice
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from common import device_name

from pipeline.coders import build_coder, coder_config_from_dict
from pipeline.evaluation.run_metrics import ProbeRows, stream_pass, union_layers
from pipeline.harvest.models import resolve_device
from pipeline.manifests.harvest import HarvestManifest, load_harvest_manifest
from pipeline.paths import RunPaths
from pipeline.store.format import atomic_write_json
from pipeline.store.reader import ActivationStore
from pipeline.training.checkpoint import save_coder
from pipeline.training.loader import ActivationLoader
from pipeline.training.manifest import CoderManifest
from stages import evaluate, harvest

DEFAULT_STORE = {
    "model": {"source": "random", "n_layers": 8, "d_model": 256, "seed": 0},
    "text": {"source": "wiki_summaries", "languages": ["en", "fr", "es"]},
    "tokenization": {"context_length": 128, "num_tokens": 131072, "test_fraction": 0.5},
    "storage": {"chunk_tokens": 4096},
    "run": {"batch_size": 32, "progress": False},
}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def make_runs(store: ActivationStore, root: Path, latents: int, k: int, rank: int) -> list[Path]:
    """Freshly initialised crosscoder and fmxcoder saved as finished runs of ``store``."""
    common = {"n_latents": latents, "activation": "topk", "k": k}
    coders = {
        "crosscoder": {"kind": "crosscoder", **common},
        "fmxcoder": {"kind": "fmxcoder", "rank": rank, "masking_probability": 0.25, **common},
    }
    runs = []
    for name, spec in coders.items():
        manifest = CoderManifest.model_validate(
            {
                "name": name,
                "cache": {"key": store.key, "root": str(store.paths.root.parent)},
                "coder": spec,
            }
        )
        config = coder_config_from_dict(
            {**spec, "n_layers": store.n_layers, "d_model": store.d_model}
        )
        paths = RunPaths(root / name)
        save_coder(paths.final, build_coder(config), {"step": 0, "name": name})
        record = {"cache_key": store.key, "manifest": manifest.model_dump(mode="json")}
        atomic_write_json(paths.manifest, record)
        runs.append(paths.root)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--harvest", default=None, help="Harvest manifest (default: built in).")
    parser.add_argument("--latents", type=int, default=512)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--splice", action="store_true", help="Include the spliced-in loss.")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    device = resolve_device(args.device)
    spec = (
        load_harvest_manifest(args.harvest)
        if args.harvest
        else HarvestManifest.model_validate(DEFAULT_STORE)
    )
    store = ActivationStore(harvest.run(spec).path)
    with tempfile.TemporaryDirectory() as tmp:
        runs = make_runs(store, Path(tmp) / "runs", args.latents, args.k, args.rank)
        options = evaluate.EvaluateOptions(
            max_tokens=args.max_tokens, splice=args.splice, progress=False, device=str(device)
        )
        store_layers = list(range(store.n_layers))
        split_tokens = ActivationLoader(store, batch_size=1, split="test").n_tokens
        if args.max_tokens:
            split_tokens = min(split_tokens, args.max_tokens)
        decoded_mb = split_tokens * len(store_layers) * store.d_model * 4 / 2**20
        chunk_mb = store.chunk_tokens * len(store_layers) * store.d_model * 4 / 2**20

        _, variants = evaluate.load_variants(runs, options, device)
        union = union_layers(variants)
        loader = ActivationLoader(
            store, batch_size=1024, layers=union, split="test", mode="stream", device=device
        )
        probe = ProbeRows(np.zeros(0, np.int64), np.full(store.n_tokens, -1, np.int64), 0)
        rss_before = rss_mb()
        tracemalloc.start()
        started = time.perf_counter()
        with torch.no_grad():
            passed = stream_pass(
                loader, variants, probe, max_tokens=args.max_tokens, progress=False
            )
        pass_seconds = time.perf_counter() - started
        pass_traced = tracemalloc.get_traced_memory()[1] / 2**20
        pass_rss = rss_mb() - rss_before
        tracemalloc.reset_peak()
        started = time.perf_counter()
        evaluate.run(runs, Path(tmp) / "report", options)
        stage_seconds = time.perf_counter() - started
        stage_traced = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        stage_rss = rss_mb() - rss_before
    n = int(passed.eval_rows.size)
    figures = {
        "device": device_name(device),
        "torch": torch.__version__,
        "store": store.key,
        "layers": store.n_layers,
        "d_model": store.d_model,
        "latents": args.latents,
        "k": args.k,
        "variants": len(runs),
        "eval_tokens": n,
        "decoded_split_mb": decoded_mb,
        "decoded_chunk_mb": chunk_mb,
        "core_pass_tokens_per_s": n / pass_seconds,
        "core_pass_variant_tokens_per_s": n * len(runs) / pass_seconds,
        "core_pass_peak_rss_increase_mb": pass_rss,
        "core_pass_tracemalloc_peak_mb": pass_traced,
        "stage_tokens_per_s": n / stage_seconds,
        "stage_seconds": stage_seconds,
        "stage_peak_rss_increase_mb": stage_rss,
        "stage_tracemalloc_peak_mb": stage_traced,
        "splice": args.splice,
    }
    width = max(map(len, figures))
    for name, value in figures.items():
        shown = f"{value:,.3f}" if isinstance(value, float) else str(value)
        print(f"{name:<{width}}  {shown}")
    out = Path(args.out or f"bench/results/evaluate-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
