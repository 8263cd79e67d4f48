"""Scaling: harvest and train throughput at 1 and 2 processes, and at two token counts.

Every figure comes from the real CLI (``pipeline harvest``, ``pipeline train``,
``torchrun``) run as a subprocess on fresh cache and run roots, so it includes what a
user pays. Peak memory is the largest sum of RSS over the process tree, sampled every
50 ms (``psutil``).

* harvest: one process (all threads) vs ``--scheduler local:1`` and ``local:2`` (dask
  worker processes, one thread each);
* train: one process vs ``torchrun --nproc-per-node 2`` (gloo, one thread a rank), the
  same global batch, on each cache size (the loader keeps the split resident, so its
  memory grows with the cache).

    python bench/scaling.py                     # SmolLM2, 6 layers, 4096 and 16384 tokens
    python bench/scaling.py --tokens 4096,65536
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
import yaml
from common import cpu_model, load_average

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LAYERS = [0, 6, 12, 17, 23, 29]


def run_measured(command: list[str], env: dict[str, str]) -> dict:
    """Run ``command``; wall seconds, peak tree RSS (MB) and its output."""
    started = time.perf_counter()
    process = psutil.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO
    )
    peak = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                tree = [process, *process.children(recursive=True)]
                total = sum(p.memory_info().rss for p in tree if p.is_running())
                peak = max(peak, total / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = process.communicate()
    done.set()
    sampler.join()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{output[-3000:]}")
    return {"wall_seconds": wall, "peak_rss_mb": peak, "output": output}


def harvest_manifest(tokens: int, path: Path) -> Path:
    manifest = yaml.safe_load((REPO / "manifests/harvest/smollm2-wiki-smoke.yaml").read_text())
    manifest["tokenization"]["num_tokens"] = tokens
    manifest["hooks"]["layers"] = LAYERS
    manifest.setdefault("run", {})["progress"] = False
    path.write_text(yaml.safe_dump(manifest))
    return path


def coder_manifest(harvest: Path, steps: int, batch: int, path: Path) -> Path:
    manifest = {
        "name": "scaling-crosscoder",
        "cache": {"harvest_manifest": str(harvest)},
        "layers": list(range(len(LAYERS))),
        "coder": {"kind": "crosscoder", "n_latents": 1024, "activation": "topk", "k": 32},
        "training": {"tokens": steps * batch, "batch_size": batch, "lr": 0.001},
        "run": {"progress": False},
    }
    path.write_text(yaml.safe_dump(manifest))
    return path


def harvest_figures(manifest: Path, tokens: int, workers: int | None, root: Path, env) -> dict:
    """One fresh harvest; ``workers`` None: in this process, else dask ``local:N``."""
    cache = root / f"cache-{tokens}-{workers or 0}"
    command = [str(BIN / "pipeline"), "harvest", str(manifest), "--cache-root", str(cache)]
    if workers:
        command += ["--scheduler", f"local:{workers}"]
    measured = run_measured(command, env)
    record = json.loads(next(cache.glob("*/complete.json")).read_text())
    rate = re.search(r"harvested at ([\d,.]+) tok/s", measured.pop("output"))
    return {
        "processes": workers or 1,
        "mode": f"dask local:{workers}" if workers else "one process",
        "tokens": tokens,
        "tokens_per_s": float(rate.group(1).replace(",", "")) if rate else None,
        "wall_tokens_per_s": tokens / measured["wall_seconds"],
        "harvest_seconds_record": record["harvest_seconds"],
        **measured,
        "cache": str(cache),
    }


def train_figures(manifest: Path, cache: Path, ranks: int, root: Path, env, steps: int) -> dict:
    runs = root / f"runs-{manifest.stem}-{ranks}"
    env = {**env, "FMX_CACHE_DIR": str(cache), "FMX_RUNS_DIR": str(runs)}
    train = [str(BIN / "pipeline"), "train", str(manifest), "--device", "cpu"]
    if ranks == 1:
        command = train
    else:
        env["OMP_NUM_THREADS"] = "1"
        command = [str(BIN / "torchrun"), "--nproc-per-node", str(ranks), "--no-python", *train]
    measured = run_measured(command, env)
    measured.pop("output")
    metrics = [
        json.loads(line)
        for path in runs.rglob("metrics.jsonl")
        for line in path.read_text().splitlines()
    ]
    logged = [m["tokens_per_second"] for m in metrics[1:]]  # the first includes warm-up
    return {
        "processes": ranks,
        "mode": "one process" if ranks == 1 else f"torchrun {ranks} ranks (gloo)",
        "steps": steps,
        "logged_tokens_per_s": sum(logged) / len(logged) if logged else None,
        **measured,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="4096,16384", help="cache sizes (comma list)")
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/scaling-cpu.json")
    args = parser.parse_args()
    sizes = [int(t) for t in args.tokens.split(",")]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    harvests, trains = [], []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fmx-scaling-") as tmp:
        root = Path(tmp)
        for tokens in sizes:
            manifest = harvest_manifest(tokens, root / f"harvest-{tokens}.yaml")
            for workers in (None, 1, 2):
                figures = harvest_figures(manifest, tokens, workers, root, env)
                harvests.append(figures)
                print(
                    f"harvest {tokens:>6} tokens, {figures['mode']:<13}: "
                    f"{figures['tokens_per_s'] or 0:8.1f} tok/s (block loop), "
                    f"{figures['wall_tokens_per_s']:7.1f} tok/s wall, "
                    f"peak {figures['peak_rss_mb']:7.0f} MB",
                    flush=True,
                )
            cache = Path(harvests[-3]["cache"])
            coder = coder_manifest(manifest, args.steps, args.batch, root / f"coder-{tokens}.yaml")
            for ranks in (1, 2):
                figures = {
                    "tokens_in_cache": tokens,
                    **train_figures(coder, cache, ranks, root, env, args.steps),
                }
                trains.append(figures)
                print(
                    f"train on {tokens:>6}-token cache, {figures['mode']:<22}: "
                    f"{figures['logged_tokens_per_s'] or 0:8.1f} tok/s logged, "
                    f"{args.steps / figures['wall_seconds']:5.2f} steps/s wall, "
                    f"peak {figures['peak_rss_mb']:7.0f} MB",
                    flush=True,
                )
        for figures in harvests:
            figures.pop("cache")
        shutil.rmtree(root, ignore_errors=True)

    def ratio(rows: list[dict], key: str, **where) -> float | None:
        picked = {r["processes"]: r[key] for r in rows if all(r[k] == v for k, v in where.items())}
        if not picked.get(1) or not picked.get(2):
            return None
        return picked[2] / picked[1]

    summary = {
        f"harvest_{t}_dask2_vs_dask1": ratio(
            [h for h in harvests if h["mode"].startswith("dask")], "tokens_per_s", tokens=t
        )
        for t in sizes
    }
    summary.update(
        {
            f"train_{t}_2ranks_vs_1": ratio(trains, "logged_tokens_per_s", tokens_in_cache=t)
            for t in sizes
        }
    )
    figures = {
        "device": f"cpu ({cpu_model()})",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "load_average_end": load_average(),
        "wall_seconds": time.perf_counter() - started,
        "model": "SmolLM2-135M (packaged GGUF, dequantised), fp32 forward, 6 layers",
        "layers": LAYERS,
        "coder": "crosscoder m=1024, TopK k=32, batch 512",
        "harvest": harvests,
        "train": trains,
        "ratios": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
