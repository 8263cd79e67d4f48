"""Training-step time with the dense reference decode vs the sparse (embedding_bag) decode.

One step = ``training_loss`` + backward + Adam, on random data. Dense and sparse steps are
interleaved (ABAB...) so that load from other processes hits both alike; medians (and
minima, the least disturbed steps) reported.

    python bench/decode.py --latents 1024 4096 --steps 9
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from common import device_name

from pipeline.coders import build_coder, coder_config_from_dict, factorized


def step_time(coder, optimizer, x: torch.Tensor, sparse: bool) -> float:
    saved = factorized.SPARSE_DECODE_MAX_DENSITY
    factorized.SPARSE_DECODE_MAX_DENSITY = saved if sparse else 0.0  # 0: always dense
    try:
        started = time.perf_counter()
        out = coder.training_loss(x, 0, 100)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        return time.perf_counter() - started
    finally:
        factorized.SPARSE_DECODE_MAX_DENSITY = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--activation", default="topk", choices=["topk", "batchtopk"])
    parser.add_argument("--out", type=Path, default=Path("bench/results/decode-cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = {
        "crosscoder": {"kind": "crosscoder"},
        "fmxcoder R=3": {"kind": "fmxcoder", "rank": 3},
    }
    x = torch.randn(
        args.batch, args.layers, args.d_model, generator=torch.Generator().manual_seed(0)
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.activation}")
    print(f"L={args.layers} d={args.d_model} k={args.k} batch={args.batch}, median of {args.steps}")
    rows = []
    for m in args.latents:
        for name, extra in variants.items():
            cfg = {
                "n_layers": args.layers,
                "d_model": args.d_model,
                "n_latents": m,
                "activation": args.activation,
                "k": args.k,
                **extra,
            }
            coder = build_coder(coder_config_from_dict(cfg))
            optimizer = torch.optim.Adam(coder.parameters(), lr=1e-4)
            times: dict[bool, list[float]] = {False: [], True: []}
            for i in range(2 * (args.steps + 1)):
                sparse = bool(i % 2)
                t = step_time(coder, optimizer, x, sparse)
                if i >= 2:  # first pair: warm-up
                    times[sparse].append(t)
            dense_s, sparse_s = (statistics.median(times[s]) for s in (False, True))
            dense_min, sparse_min = (min(times[s]) for s in (False, True))
            rows.append(
                {
                    "latents": m,
                    "coder": name,
                    "dense_step_ms_median": dense_s * 1e3,
                    "sparse_step_ms_median": sparse_s * 1e3,
                    "sparse_speedup_median": dense_s / sparse_s,
                    "sparse_speedup_min": dense_min / sparse_min,
                }
            )
            print(
                f"m={m:6d} {name:13s} median: dense {dense_s * 1e3:6.0f} ms, sparse "
                f"{sparse_s * 1e3:6.0f} ms, {dense_s / sparse_s:4.2f}x | min: dense "
                f"{dense_min * 1e3:6.0f} ms, sparse {sparse_min * 1e3:6.0f} ms, "
                f"{dense_min / sparse_min:4.2f}x"
            )
    figures = {
        "device": device_name(torch.device("cpu")),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "layers": args.layers,
        "d_model": args.d_model,
        "k": args.k,
        "batch": args.batch,
        "activation": args.activation,
        "steps": args.steps,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
