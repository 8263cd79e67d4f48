"""8-bit stores against bf16, in one run: bytes, convert and decode speed, added error, and
what it costs a trained coder (writes ``bench/results/storage-cpu.json``).

    python bench/storage.py            # ~10-15 min on 2 shared cores

Real activations: SmolLM2-135M over the packaged Wikipedia summaries, the cpu-large layers
(10 of 30), ``--tokens`` harvested (cpu-large has 65,536: scaled down to fit a shared
2-core session; the bf16 store lands in the data dir's cache and is reused). The 8-bit
stores are ``pipeline convert``-ed from it in a temporary cache root. Downstream: a
crosscoder and the default fmxcoder (cpu-large's settings, ``--latents`` latents, k 32)
trained on each store with the same seeds, lr and steps, all evaluated on the bf16 store's
test split (FVU per layer in raw units, massive tokens excluded as in training). The planted
cache: a crosscoder per dtype and seed, scored by recovery of the true features (MMCS).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from pipeline.api import load_coder
from pipeline.evaluation.recovery import TruthView, planted_truth, raw_decoder, recover
from pipeline.manifests.harvest import HarvestManifest
from pipeline.store.format import FP8_TABLE, QUANTISED, SCALES_FILE, chunk_files
from pipeline.store.outliers import excluded_rows, outlier_scan
from pipeline.store.reader import ActivationStore
from pipeline.training.loader import split_rows
from pipeline.training.manifest import CoderManifest
from pipeline.training.readers import ChunkDecoder, Normaliser
from stages import convert, harvest, train

REPO = Path(__file__).resolve().parent.parent
DTYPES = ["bfloat16", *QUANTISED]
MASSIVE_RATIO = 30.0  # the training default (training.outlier_norm_ratio)
TOPK32 = {"activation": "topk", "k": 32}
FMX = {
    "kind": "fmxcoder",
    **TOPK32,
    "encoder_factorization": "per_latent",
    "decoder_factorization": "per_latent",
    "rank": 2,
    "masking_probability": 0.25,
    "masking_rescale": True,
    "collapse_coefficient": 0.1,
}


def harvest_real(tokens: int) -> ActivationStore:
    data = yaml.safe_load((REPO / "manifests/harvest/smollm2-wiki-cpu-large.yaml").read_text())
    data["tokenization"]["num_tokens"] = tokens
    data["run"] = {"progress": False}
    return ActivationStore(harvest.run(HarvestManifest.model_validate(data)).path)


def store_bytes(store: ActivationStore) -> dict:
    """Chunk bytes (and the scales file) per token and layer."""
    chunks = sum(sum(chunk_files(store.paths.array(h)).values()) for h in store.hook_names)
    scales = store.paths.root / SCALES_FILE
    extra = scales.stat().st_size if scales.is_file() else 0
    cells = store.n_tokens * store.n_layers
    return {
        "chunk_bytes": chunks,
        "scales_bytes": extra,
        "bytes_per_token_layer": (chunks + extra) / cells,
        "bytes_per_value": (chunks + extra) / cells / store.d_model,
    }


def read_rate(store: ActivationStore) -> float:
    """Rows/s reading every block in the storage representation (what convert reads)."""
    started = time.perf_counter()
    for chunk in range(store.n_chunks):
        store.read_stored(*store.chunk_rows(chunk))
    return store.n_tokens / (time.perf_counter() - started)


def decode_rates(stores: dict, rounds: int = 5) -> dict:
    """Rows/s of the loader's CPU decode (whole chunks -> normalised float32, 2 threads),
    the dtypes interleaved round by round so a shared machine's load hits them alike."""
    decoders = {}
    for dtype, store in stores.items():
        layers = list(range(store.n_layers))
        decoder = ChunkDecoder(store, layers, np.arange(store.n_tokens), workers=2)
        decoders[dtype] = (decoder, Normaliser.from_store(store, layers, centre=True))
    rates: dict[str, list[float]] = {dtype: [] for dtype in stores}
    for _ in range(rounds):
        for dtype, (decoder, normaliser) in decoders.items():
            started = time.perf_counter()
            for chunk in range(decoder.store.n_chunks):
                decoder.decode([chunk], normaliser)
            rates[dtype].append(decoder.store.n_tokens / (time.perf_counter() - started))
    out = {d: {"rows_per_s_median": float(np.median(r)), "rows_per_s": r} for d, r in rates.items()}
    for dtype in QUANTISED:
        ratios = np.array(rates[dtype]) / np.array(rates["bfloat16"])
        out[dtype]["vs_bf16_per_round"] = ratios.tolist()
        out[dtype]["vs_bf16_median"] = float(np.median(ratios))
    for decoder, _ in decoders.values():
        decoder.close()
    return out


def fake_quantise(x: np.ndarray, scale: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` through ``dtype`` codes at ``scale`` (broadcast), for the granularity study."""
    top = QUANTISED[dtype]
    safe = np.where(scale > 0, scale, 1.0)
    y = np.clip(x / safe, -top, top)
    if dtype == "int8":
        return np.round(y) * scale
    codes = torch.from_numpy(y.astype(np.float32)).to(torch.float8_e4m3fn).view(torch.uint8)
    return FP8_TABLE[codes.numpy()] * scale


def massive_mask(x: np.ndarray) -> np.ndarray:
    """Per layer: tokens whose norm exceeds MASSIVE_RATIO x the layer's median norm."""
    norms = np.linalg.norm(x, axis=2)
    return norms > MASSIVE_RATIO * np.median(norms, axis=0, keepdims=True)


def added_error(x: np.ndarray, y: np.ndarray, massive: np.ndarray) -> dict:
    """Per layer: squared error as a fraction of the layer's variance (normal tokens), and
    of the massive tokens' own squared norm (relative error there)."""
    normal = ~massive
    out = {"fvu_normal": [], "relative_massive": []}
    for layer in range(x.shape[1]):
        keep = normal[:, layer]
        xs, ys = x[keep, layer], y[keep, layer]
        variance = ((xs - xs.mean(0)) ** 2).sum()
        out["fvu_normal"].append(float(((ys - xs) ** 2).sum() / variance))
        big = massive[:, layer]
        if big.any():
            xm, ym = x[big, layer], y[big, layer]
            out["relative_massive"].append(float(((ym - xm) ** 2).sum() / (xm**2).sum()))
        else:
            out["relative_massive"].append(None)
    fvu = out["fvu_normal"]
    out["fvu_normal_mean"], out["fvu_normal_max"] = float(np.mean(fvu)), float(np.max(fvu))
    return out


def granularity_study(x: np.ndarray, massive: np.ndarray) -> dict:
    """Added error of each scale granularity on the bf16 values (scales exact, float32)."""
    absmax_token = np.abs(x).max(axis=2, keepdims=True)  # [n, L, 1]
    absmax_channel = np.abs(x).max(axis=0, keepdims=True)  # [1, L, d]
    absmax_layer = np.abs(x).max(axis=(0, 2), keepdims=True)  # [1, L, 1]
    out = {}
    for dtype, top in QUANTISED.items():
        for name, absmax in (
            ("token_and_layer", absmax_token),
            ("layer_and_channel", absmax_channel),
            ("layer", absmax_layer),
        ):
            y = fake_quantise(x, absmax / top, dtype)
            error = added_error(x, y, massive)
            out[f"{dtype}/{name}"] = {
                k: error[k] for k in ("fvu_normal_mean", "fvu_normal_max", "relative_massive")
            }
    return out


def train_variant(
    store: ActivationStore, coder: dict, seed: int, args, runs: Path, name: str
) -> Path:
    manifest = CoderManifest.model_validate(
        {
            "name": name,
            "cache": {"key": store.key, "root": str(store.paths.root.parent)},
            "coder": {**coder, "seed": seed},
            "training": {
                "tokens": args.steps * args.batch,
                "batch_size": args.batch,
                "lr": args.lr,
                "seed": seed,
                "checkpoint_every": 10_000,
                "log_every": 10_000,
            },
            "run": {"device": "cpu", "runs_root": str(runs), "progress": False},
        }
    )
    (result,) = train.run([(manifest, runs)])
    return result.run_dir


def test_fvu(run_dir: Path, reference: ActivationStore) -> float:
    """Mean over layers of the raw-unit FVU on the reference store's test split (massive
    tokens excluded, as training excludes them)."""
    coder = load_coder(run_dir)
    rows = split_rows(
        reference, "test", exclude=excluded_rows(outlier_scan(reference, MASSIVE_RATIO))
    )
    x = reference.read(0, reference.n_tokens)[torch.from_numpy(rows)]
    residual = torch.zeros(x.shape[1], dtype=torch.float64)
    for start in range(0, x.shape[0], 2048):
        batch = x[start : start + 2048]
        residual += ((coder(batch) - batch).double() ** 2).sum((0, 2))
    variance = ((x - x.mean(0)).double() ** 2).sum((0, 2))
    return float((residual / variance).mean())


def recovery(run_dir: Path, store: ActivationStore) -> float:
    features, layers = planted_truth(store.manifest)
    coder = load_coder(run_dir)
    truth = TruthView.of(features, [layers[j] for j in coder.record.layers])
    decoder = raw_decoder(coder.coder.decoder_weight(), coder.record.scale)
    return float(recover(truth, decoder).mmcs.mean())


def spread(values: list[float]) -> dict:
    return {"values": values, "mean": float(np.mean(values)), "std": float(np.std(values))}


def derive(source: ActivationStore, root: Path) -> tuple[dict, dict]:
    """Copy ``source`` under ``root`` and convert it to each 8-bit dtype: the stores, and
    the convert throughput against reading the source."""
    shutil.copytree(source.paths.root, root / source.key)
    local = ActivationStore(root / source.key)
    stores, timing = {"bfloat16": local}, {"read_source_rows_per_s": read_rate(local)}
    for dtype in QUANTISED:
        started = time.perf_counter()
        result = convert.run(local.key, dtype, root)
        seconds = time.perf_counter() - started
        stores[dtype] = ActivationStore(result.path)
        timing[f"convert_{dtype}_rows_per_s"] = local.n_tokens / seconds
        timing[f"convert_{dtype}_vs_read_source"] = (
            timing[f"convert_{dtype}_rows_per_s"] / timing["read_source_rows_per_s"]
        )
    return stores, timing


def downstream(stores: dict, coders: dict, args, runs: Path, measure) -> dict:
    out = {}
    for coder_name, coder in coders.items():
        for dtype, store in stores.items():
            values = []
            for seed in args.seeds:
                run_dir = train_variant(store, coder, seed, args, runs, f"{coder_name}-{dtype}")
                values.append(measure(run_dir))
            out[f"{coder_name}/{dtype}"] = spread(values)
            print(f"  {coder_name} {dtype}: {out[f'{coder_name}/{dtype}']}", flush=True)
        base = out[f"{coder_name}/bfloat16"]["mean"]
        for dtype in QUANTISED:
            entry = out[f"{coder_name}/{dtype}"]
            entry["relative_to_bf16"] = (entry["mean"] - base) / base
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--latents", type=int, default=512)
    parser.add_argument("--steps", type=int, default=96)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--planted-steps", type=int, default=96)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/storage-cpu.json")
    args = parser.parse_args()
    started = time.perf_counter()
    result: dict = {
        "device": common.device_name(torch.device("cpu")),
        "load_average_start": common.load_average(),
        "recipe": {
            "store": f"smollm2-wiki-cpu-large.yaml at {args.tokens} tokens (cpu-large: 65536)",
            "coders": f"crosscoder and default fmxcoder, {args.latents} latents, k 32 "
            f"(cpu-large: 1024), {args.steps} steps x {args.batch} tokens, lr {args.lr}, "
            f"seeds {args.seeds}, massive tokens (>{MASSIVE_RATIO:g}x median) dropped",
            "evaluation": "raw-unit FVU per layer, mean over layers, bf16 store's test split",
            "planted": f"manifests/harvest/planted.yaml, crosscoder 256 latents k 8, "
            f"{args.planted_steps} steps x {args.batch}; measure: mean MMCS of true features",
            "not_measured": "probe F1; direct 8-bit harvest throughput (= bf16 harvest + the "
            "quantise/write cost that convert times)",
        },
    }
    with tempfile.TemporaryDirectory(prefix="fmx-storage-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        source = harvest_real(args.tokens)
        result["harvest_bf16_seconds_or_cache_hit"] = time.perf_counter() - t0
        stores, result["throughput"] = derive(source, tmp / "cache")
        result["bytes"] = {d: store_bytes(s) for d, s in stores.items()}
        base = result["bytes"]["bfloat16"]["bytes_per_token_layer"]
        for d in QUANTISED:
            result["bytes"][d]["vs_bf16"] = result["bytes"][d]["bytes_per_token_layer"] / base
        result["decode"] = decode_rates(stores)
        x = stores["bfloat16"].read(0, source.n_tokens).numpy()
        massive = massive_mask(x)
        result["massive_tokens_per_layer"] = massive.sum(0).tolist()
        result["added_error"] = {
            d: added_error(x, stores[d].read(0, source.n_tokens).numpy(), massive)
            for d in QUANTISED
        }
        result["granularity"] = granularity_study(x, massive)
        del x
        print(json.dumps({k: result[k] for k in ("bytes", "throughput")}, indent=1), flush=True)
        coders = {
            "crosscoder": {
                "kind": "crosscoder",
                "n_latents": args.latents,
                "activation": "topk",
                "k": 32,
            },
            "fmxcoder": {**FMX, "n_latents": args.latents},
        }
        reference = stores["bfloat16"]
        result["downstream_test_fvu"] = downstream(
            stores, coders, args, tmp / "runs", lambda run: test_fvu(run, reference)
        )
        planted_data = yaml.safe_load((REPO / "manifests/harvest/planted.yaml").read_text())
        planted = ActivationStore(
            harvest.run(HarvestManifest.model_validate(planted_data), tmp / "planted-src").path
        )
        planted_stores, result["planted_throughput"] = derive(planted, tmp / "planted")
        small = {
            "crosscoder": {"kind": "crosscoder", "n_latents": 256, "activation": "topk", "k": 8}
        }
        planted_args = argparse.Namespace(**{**vars(args), "steps": args.planted_steps})
        result["planted_recovery_mmcs"] = downstream(
            planted_stores,
            small,
            planted_args,
            tmp / "planted-runs",
            lambda run: recovery(run, planted_stores["bfloat16"]),
        )
    result["wall_seconds"] = time.perf_counter() - started
    result["load_average_end"] = common.load_average()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} in {result['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
