"""8-bit stores against bf16, in one run: bytes, harvest, convert and decode speed, added
error, and what it costs a trained coder (writes ``bench/results/storage-cpu.json``).

    nice python bench/storage.py                    # every part
    nice python bench/storage.py --parts harvest    # or some: store harvest downstream planted
    python bench/storage.py --table                 # the results file as the README's tables
    python bench/storage.py --table --more-seeds F  # ... its downstream seeds pooled with F's

Real activations: SmolLM2-135M over the packaged Wikipedia summaries, the cpu-large layers
(10 of 30) and ``--tokens`` tokens (at 65,536 the cpu-large cache itself, reused from the
data dir's cache when present). The 8-bit stores are ``pipeline convert``-ed from a copy in
a temporary cache root; a harvest per dtype (same tokens, ``--harvest-tokens`` per round)
is timed against the bare forward. Downstream: a crosscoder and the default fmxcoder
(by default cpu-large's recipe: 1,024 latents at k 32, 512 steps of 512 tokens, each at
the lr its sweep chose in results/cpu-large/lr_sweep.json; ``--latents``/``--steps`` scale it
down) trained on each store with the same seeds, lr and steps, all evaluated on the bf16
store's test split: FVU per layer in raw units (massive tokens excluded as in training)
and probe F1 as the evaluate stage computes it. The planted cache:
a crosscoder per dtype and seed, scored by recovery of the true features (MMCS). Every
figure is a mean and sample sd over seeds, with the 8-bit difference from bf16.
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
import harvest as harvest_bench  # bench/harvest.py: the bare forward it times against

from pipeline.api import load_coder
from pipeline.evaluation.concepts import build_gazetteer
from pipeline.evaluation.probe_suite import build_tasks, f1_by_k, score_rows
from pipeline.evaluation.probing import DEFAULT_KS, decoder_norm_weights
from pipeline.evaluation.recovery import TruthView, planted_truth, raw_decoder, recover
from pipeline.evaluation.run_metrics import Variant, _FeatureRows, union_layers
from pipeline.harvest.models import load_model
from pipeline.harvest.text_sources import load_documents
from pipeline.harvest.windows import build_windows
from pipeline.manifests.harvest import HarvestManifest
from pipeline.paths import RunPaths
from pipeline.store.format import FP8_TABLE, QUANTISED, SCALES_FILE, chunk_files
from pipeline.store.outliers import excluded_rows, outlier_scan
from pipeline.store.reader import ActivationStore
from pipeline.training.loader import ActivationLoader, split_rows
from pipeline.training.manifest import CoderManifest
from pipeline.training.readers import ChunkDecoder, Normaliser
from stages import convert, harvest, train

REPO = Path(__file__).resolve().parent.parent
CPU_LARGE = {"tokens": 65536, "latents": 1024, "steps": 512, "batch": 512}
# Each coder's learning rate as results/cpu-large/lr_sweep.json chose it (validation FVU).
CPU_LARGE_LR = {"crosscoder": 0.001, "fmxcoder": 0.003}
PLANTED_LR = 0.001
DTYPES = ["bfloat16", *QUANTISED]
PARTS = ("store", "harvest", "downstream", "planted")
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


def cpu_large(tokens: int, seed: int = 0, dtype: str = "bfloat16") -> HarvestManifest:
    """The cpu-large harvest manifest at ``tokens`` tokens, tokenisation ``seed`` and
    ``dtype`` (at 65,536 tokens, seed 0, bf16: the cpu-large cache itself)."""
    data = yaml.safe_load((REPO / "manifests/harvest/smollm2-wiki-cpu-large.yaml").read_text())
    data["tokenization"].update(num_tokens=tokens, seed=seed)
    data["storage"]["dtype"] = dtype
    data["run"]["progress"] = False
    return HarvestManifest.model_validate(data)


def harvest_real(tokens: int) -> ActivationStore:
    return ActivationStore(harvest.run(cpu_large(tokens)).path)


def harvest_rates(tokens: int, rounds: int, root: Path) -> dict:
    """Harvest tokens/s of each dtype against the model's bare forward on the same tokens
    (``bench/harvest.py``'s: same hooks, batches and early stop, nothing stored), in rounds:
    the bare forward over a round's windows, then a harvest of them per dtype (a fresh
    tokenisation seed per round), so all see the same load on a shared machine."""
    first = cpu_large(tokens)
    model = load_model(first.model, "cpu")
    hooks, batch = model.hook_names(first.hooks), first.run.batch_size
    documents = load_documents(first.text)
    bare: list[float] = []
    rates: dict[str, list[float]] = {dtype: [] for dtype in DTYPES}
    for r in range(rounds):
        tokenization = cpu_large(tokens, seed=100 + r).tokenization
        windows = build_windows(documents, model.tokenizer, tokenization).token_ids
        if r == 0:  # warm-up batch, untimed
            harvest_bench.bare_forward_seconds(model, windows[:batch], hooks, batch, DTYPES[0])
        seconds = harvest_bench.bare_forward_seconds(model, windows, hooks, batch, DTYPES[0])
        bare.append(tokens / seconds)
        for dtype in DTYPES:
            result = harvest.run(cpu_large(tokens, 100 + r, dtype), root)
            rates[dtype].append(float(result.tokens_per_second))
    out: dict = {"tokens_per_round": tokens, "rounds": rounds, "bare_forward_tokens_per_s": bare}
    for dtype, values in rates.items():
        ratios = np.array(values) / np.array(bare)
        out[dtype] = {
            "tokens_per_s": values,
            "vs_bare_forward_per_round": ratios.tolist(),
            "vs_bare_forward_median": float(np.median(ratios)),
        }
    return out


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
    store: ActivationStore, coder: dict, lr: float, seed: int, args, runs: Path, name: str
) -> Path:
    manifest = CoderManifest.model_validate(
        {
            "name": name,
            "cache": {"key": store.key, "root": str(store.paths.root.parent)},
            "coder": {**coder, "seed": seed},
            "training": {
                "tokens": args.steps * args.batch,
                "batch_size": args.batch,
                "lr": lr,
                "seed": seed,
                "checkpoint_every": 10_000,
                "log_every": 10_000,
            },
            "run": {"device": "cpu", "runs_root": str(runs), "progress": False},
        }
    )
    (result,) = train.run([(manifest, runs)])
    return result.run_dir


def test_activations(reference: ActivationStore) -> torch.Tensor:
    """Raw ``[n, L, d]`` of the reference store's test split, massive tokens excluded as
    training excludes them (read once, chunk by chunk, for every run's FVU)."""
    rows = split_rows(
        reference, "test", exclude=excluded_rows(outlier_scan(reference, MASSIVE_RATIO))
    )
    parts = []
    for chunk in range(reference.n_chunks):
        start, stop = reference.chunk_rows(chunk)
        here = rows[(rows >= start) & (rows < stop)] - start
        if here.size:
            parts.append(reference.read(start, stop)[torch.from_numpy(here)])
    return torch.cat(parts)


def test_fvu(run_dir: Path, x: torch.Tensor) -> float:
    """Mean over layers of the raw-unit FVU on test activations ``x``."""
    coder = load_coder(run_dir)
    residual = torch.zeros(x.shape[1], dtype=torch.float64)
    for start in range(0, x.shape[0], 2048):
        batch = x[start : start + 2048]
        residual += ((coder(batch) - batch).double() ** 2).sum((0, 2))
    variance = ((x - x.mean(0)).double() ** 2).sum((0, 2))
    return float((residual / variance).mean())


def run_variant(run_dir: Path, name: str) -> Variant:
    """A trained run as the evaluation pass takes it, normalised as it was trained (its own
    store's statistics, from the run's record) whichever store it then reads."""
    raw = load_coder(run_dir)
    record = raw.record
    normaliser = Normaliser(record.mean, record.scale, record.centre)
    return Variant(
        name,
        name,
        run_dir,
        raw.coder,
        list(record.layers),
        normaliser,
        0,
        raw.config.kind,
        outlier_ratio=MASSIVE_RATIO,
    )


def probe_features(loader: ActivationLoader, variants: list[Variant], probe) -> dict:
    """Each variant's probing features, gathered as the evaluation pass gathers them (codes
    with decoder norms folded in, the probes' token rows and per-document means), without
    the pass's other accumulators (its coherence ablation alone is L + 1 encodes)."""
    gathered = {v.name: _FeatureRows(probe) for v in variants}
    folds = {v.name: decoder_norm_weights(v.coder, v.scale) for v in variants}
    with torch.no_grad():
        for rows, raw in loader.raw_batches():
            for v in variants:
                f = v.coder.encode(v.normalise(raw))
                gathered[v.name].update(rows, f * folds[v.name].to(f), as_sparse=True)
    return gathered


def probe_f1(runs: dict[str, list[Path]], reference: ActivationStore) -> dict[str, dict]:
    """Per run label and seed: probe F1 as the evaluate stage computes it on the reference
    store's test split (its tasks, ks, probe seed and ``score_rows``), averaged over
    concepts and k, for the token and the sequence tasks."""
    variants = [
        run_variant(run, f"{label}#{seed}")
        for label, dirs in runs.items()
        for seed, run in enumerate(dirs)
    ]
    union = union_layers(variants)
    loader = ActivationLoader(
        reference,
        batch_size=1024,
        layers=union,
        split="test",
        mode="stream",
        outlier_ratio=MASSIVE_RATIO,
    )
    tasks = build_tasks(reference.tokens(), reference.documents(), loader.rows, build_gazetteer())
    gathered = probe_features(loader, variants, tasks.rows())
    loader.close()
    out: dict[str, dict] = {label: {"token": [], "sequence": []} for label in runs}
    for name, features in gathered.items():
        token_x, token_index = features.tokens()
        rows = score_rows(name, "token", token_x, token_index, tasks.token, DEFAULT_KS, 0)
        rows += score_rows(
            name, "sequence", features.doc_means(), tasks.doc_ids, tasks.sequence, DEFAULT_KS, 0
        )
        for task in ("token", "sequence"):
            by_k = f1_by_k(rows, name, task)  # empty when no task of the kind is usable
            out[name.split("#")[0]][task].append(float(np.mean([*by_k.values()] or [np.nan])))
    out["tasks"] = {"token": len(tasks.token), "sequence": len(tasks.sequence)}
    return out


def recovery(run_dir: Path, store: ActivationStore) -> float:
    features, layers = planted_truth(store.manifest)
    coder = load_coder(run_dir)
    truth = TruthView.of(features, [layers[j] for j in coder.record.layers])
    decoder = raw_decoder(coder.coder.decoder_weight(), coder.record.scale)
    return float(recover(truth, decoder).mmcs.mean())


def spread(values: list[float]) -> dict:
    """Mean and sample sd (ddof 1) over seeds."""
    return {"values": values, "mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1))}


def against_bf16(out: dict[str, dict]) -> dict[str, dict]:
    """Adds to each 8-bit entry ``coder/dtype`` its difference from ``coder/bfloat16``
    (absolute and relative) and whether it lies within the bf16 runs' seed sd."""
    for label, entry in out.items():
        coder, dtype = label.split("/")
        if dtype in QUANTISED:
            base = out[f"{coder}/bfloat16"]
            difference = entry["mean"] - base["mean"]
            entry["difference_from_bf16"] = difference
            entry["relative_to_bf16"] = difference / base["mean"]
            entry["within_bf16_seed_sd"] = bool(abs(difference) <= base["sd"])
    return out


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


def train_all(
    stores: dict, coders: dict[str, tuple[dict, float]], args, runs: Path
) -> dict[str, list[Path]]:
    """Every coder (config, lr) on every store, same seeds, lr and steps:
    ``{coder/dtype: [run dirs]}``."""
    out = {}
    for coder_name, (coder, lr) in coders.items():
        for dtype, store in stores.items():
            out[f"{coder_name}/{dtype}"] = [
                train_variant(store, coder, lr, seed, args, runs, f"{coder_name}-{dtype}")
                for seed in args.seeds
            ]
            print(f"  trained {coder_name} on {dtype}", flush=True)
    return out


def loader_records(runs: dict[str, list[Path]]) -> dict[str, dict]:
    """Each store's loader record (``loader.json`` of its first crosscoder run): the mode,
    bytes per token as the readers hold it and resident tokens per GiB, with the ratio."""
    out = {}
    for label, dirs in runs.items():
        coder, dtype = label.split("/")
        if coder == "crosscoder":
            record = json.loads(RunPaths(dirs[0]).loader.read_text())
            out[dtype] = {
                k: record[k] for k in ("mode", "bytes_per_token", "resident_tokens_per_gib")
            }
    for dtype in QUANTISED:
        ratio = out[dtype]["resident_tokens_per_gib"] / out["bfloat16"]["resident_tokens_per_gib"]
        out[dtype]["resident_vs_bf16"] = ratio
    return out


def per_run(runs: dict[str, list[Path]], measure) -> dict[str, dict]:
    """``measure`` of every run, spread over seeds, against bf16."""
    return against_bf16({label: spread([measure(r) for r in dirs]) for label, dirs in runs.items()})


def paired(entry: dict, base: dict, relative: bool) -> tuple[float, float]:
    """Mean and sample sd of the per-seed differences from bf16 (same seed: same init and
    batch order, only the store differs), relative to the bf16 mean if ``relative``."""
    diffs = np.array(entry["values"]) - np.array(base["values"])
    diffs = diffs / base["mean"] if relative else diffs
    return float(diffs.mean()), float(diffs.std(ddof=1)) if diffs.size > 1 else 0.0


def _cell(entry: dict, base: dict, digits: int, relative: bool = True) -> str:
    """``mean ± sd`` over seeds, then (8-bit) the paired difference from bf16."""
    text = f"{entry['mean']:.{digits}f} ± {entry['sd']:.{digits}f}"
    if entry is base:
        return text
    mean, sd = paired(entry, base, relative)
    return f"{text} ({mean:+.2%} ± {sd:.2%})" if relative else f"{text} ({mean:+.3f} ± {sd:.3f})"


def pool_seeds(result: dict, more: dict) -> dict:
    """``result`` with the downstream runs of ``more`` (the same recipe, other seeds) added
    to each entry's seeds: spreads and bf16 differences recomputed over all of them."""
    if more["recipe"]["coders"].split("seeds")[0] != result["recipe"]["coders"].split("seeds")[0]:
        raise SystemExit("--more-seeds: the two files' coder recipes differ")

    def pooled(a: dict, b: dict) -> dict:
        return against_bf16({k: spread(a[k]["values"] + b[k]["values"]) for k in a})

    out = {
        **result,
        "downstream_test_fvu": pooled(result["downstream_test_fvu"], more["downstream_test_fvu"]),
    }
    probes = result.get("downstream_probe_f1", {})
    out["downstream_probe_f1"] = {
        task: pooled(probes[task], more["downstream_probe_f1"][task]) for task in probes
    }
    return out


def markdown(result: dict) -> str:
    """The README's storage tables from a results file (nothing measured here)."""
    if "bytes" not in result:  # a downstream-only run: its second table alone
        return downstream_markdown(result)
    dtypes = list(result["bytes"])
    lines = ["| | " + " | ".join(dtypes) + " |", "|---" * (len(dtypes) + 1) + "|"]

    def row(name: str, cells: list[str]) -> None:
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    sizes = result["bytes"]
    row(
        "bytes per token-layer (chunks + scales)",
        [
            f"{sizes[d]['bytes_per_token_layer']:.1f}"
            + (f" ({sizes[d]['vs_bf16']:.2f}x)" if d in QUANTISED else "")
            for d in dtypes
        ],
    )
    error = result.get("added_error", {})
    row(
        "added FVU, ordinary tokens, mean / max over layers",
        [
            "0"
            if d not in error
            else f"{error[d]['fvu_normal_mean']:.1e} / {error[d]['fvu_normal_max']:.1e}"
            for d in dtypes
        ],
    )
    row(
        "relative error on massive tokens (max over layers)",
        [
            "0"
            if d not in error
            else f"{max(v for v in error[d]['relative_massive'] if v is not None):.1e}"
            for d in dtypes
        ],
    )
    decode = result["decode"]
    row(
        "decode rows/s (median of 5 rounds; x: median per-round ratio)",
        [
            f"{decode[d]['rows_per_s_median']:,.0f}"
            + (f" ({decode[d]['vs_bf16_median']:.2f}x)" if d in QUANTISED else "")
            for d in dtypes
        ],
    )
    convert = result.get("convert_throughput")
    if convert:
        read = convert["read_source_rows_per_s"]
        cells = [
            f"{convert[f'convert_{d}_rows_per_s']:,.0f} "
            f"({convert[f'convert_{d}_vs_read_source']:.2f}x)"
            for d in dtypes[1:]
        ]
        row(f"convert rows/s (x: vs reading the bf16 store, {read:,.0f})", ["", *cells])
    loader = result.get("loader")
    if loader:
        row(
            "resident tokens per GiB (loader.json)",
            [
                f"{loader[d]['resident_tokens_per_gib']:,}"
                + (f" ({loader[d]['resident_vs_bf16']:.2f}x)" if d in QUANTISED else "")
                for d in dtypes
            ],
        )
    harvest = result.get("harvest_throughput")
    if harvest:
        row(
            "harvest vs bare forward (median of per-round ratios)",
            [f"{harvest[d]['vs_bare_forward_median']:.2f}x" for d in dtypes],
        )
    planted = result.get("planted_recovery_mmcs")
    if planted:
        row(
            "planted crosscoder MMCS of the true features",
            [_cell(planted[f"crosscoder/{d}"], planted["crosscoder/bfloat16"], 4) for d in dtypes],
        )
    return "\n".join(lines) + "\n\n" + downstream_markdown(result)


def downstream_markdown(result: dict) -> str:
    """The trained coders' table: test FVU and probe F1 per coder and store."""
    lines: list[str] = []
    fvu = result.get("downstream_test_fvu")
    if fvu:
        probes = result.get("downstream_probe_f1", {})
        tasks = [t for t in ("token", "sequence") if t in probes]
        lines += [
            "",
            "| coder / store | test FVU | " + " | ".join(f"{t} probe F1" for t in tasks) + " |",
            "|---" * (2 + len(tasks)) + "|",
        ]
        for label, entry in fvu.items():
            base = fvu[f"{label.split('/')[0]}/bfloat16"]
            cells = [_cell(entry, base, 4)]
            for t in tasks:
                task_base = probes[t][f"{label.split('/')[0]}/bfloat16"]
                cells.append(_cell(probes[t][label], task_base, 3, relative=False))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(
            f"(mean ± sd over {len(next(iter(fvu.values()))['values'])} seeds; in brackets: "
            "mean ± sd over seeds of the same-seed difference from bf16; "
            "FVU relative to bf16's mean, F1 absolute)"
        )
    return "\n".join(lines) + "\n"


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=CPU_LARGE["tokens"], help="store size")
    parser.add_argument("--error-tokens", type=int, default=16384, help="rows for added error")
    parser.add_argument("--harvest-tokens", type=int, default=2048, help="per harvest round")
    parser.add_argument("--harvest-rounds", type=int, default=2)
    parser.add_argument("--latents", type=int, default=CPU_LARGE["latents"])
    parser.add_argument("--steps", type=int, default=CPU_LARGE["steps"])
    parser.add_argument("--batch", type=int, default=CPU_LARGE["batch"])
    parser.add_argument("--lr", type=float, help="one lr for both coders (default: cpu-large's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--planted-steps", type=int, default=96)
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=list(PARTS),
        help="what to measure (store: bytes, convert, decode, added error)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (0: default; 1: see bench/harvest.py)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/storage-cpu.json")
    parser.add_argument("--table", action="store_true", help="print --out as markdown; run nothing")
    parser.add_argument(
        "--more-seeds", type=Path, help="with --table: pool this file's downstream seeds in"
    )
    return parser.parse_args()


def recipe(args: argparse.Namespace) -> dict:
    return {
        "store": f"smollm2-wiki-cpu-large.yaml at {args.tokens} tokens (cpu-large: 65536); "
        f"added error on its first {args.error_tokens}",
        "harvest": f"{args.harvest_rounds} rounds of {args.harvest_tokens} tokens: bare "
        "forward (bench/harvest.py's), then a harvest per dtype of the same tokens",
        "coders": f"crosscoder and default fmxcoder, {args.latents} latents, k 32, "
        f"{args.steps} steps x {args.batch} tokens, lr {learning_rates(args)}, seeds "
        f"{args.seeds}, massive tokens (>{MASSIVE_RATIO:g}x median) dropped; "
        + ("cpu-large's recipe" if at_cpu_large(args) else f"scaled from cpu-large's {CPU_LARGE}"),
        "evaluation": "all on the bf16 store's test split: raw-unit FVU per layer, mean over "
        "layers; probe F1 as the evaluate stage computes it (pipeline.evaluation.probe_suite, "
        f"ks {list(DEFAULT_KS)}), mean over concepts and k per run; spread: mean and sample "
        "sd (ddof 1) over seeds; within_bf16_seed_sd: |8-bit mean - bf16 mean| <= bf16 sd",
        "planted": f"manifests/harvest/planted.yaml, crosscoder 256 latents k 8, "
        f"{args.planted_steps} steps x {args.batch}, lr {PLANTED_LR}; "
        "measure: mean MMCS of true features",
    }


def quality(stores: dict, x: np.ndarray) -> dict:
    """Added error per 8-bit dtype (massive tokens apart), and per scale granularity."""
    massive = massive_mask(x)
    n = x.shape[0]
    return {
        "massive_tokens_per_layer": massive.sum(0).tolist(),
        "added_error": {
            d: added_error(x, stores[d].read(0, n).numpy(), massive) for d in QUANTISED
        },
        "granularity": granularity_study(x, massive),
    }


def at_cpu_large(args: argparse.Namespace) -> bool:
    return all(getattr(args, name) == value for name, value in CPU_LARGE.items())


def learning_rates(args: argparse.Namespace) -> dict[str, float]:
    return {name: args.lr or lr for name, lr in CPU_LARGE_LR.items()}


def coders(args: argparse.Namespace) -> dict[str, tuple[dict, float]]:
    lr = learning_rates(args)
    return {
        "crosscoder": (
            {"kind": "crosscoder", "n_latents": args.latents, **TOPK32},
            lr["crosscoder"],
        ),
        "fmxcoder": ({**FMX, "n_latents": args.latents}, lr["fmxcoder"]),
    }


def probe_figures(trained: dict[str, list[Path]], reference: ActivationStore) -> dict:
    """Probe F1 of every run on the reference test split, spread over seeds, vs bf16."""
    probes = probe_f1(trained, reference)
    tasks = probes.pop("tasks")
    figures = {
        task: against_bf16({label: spread(v[task]) for label, v in probes.items()})
        for task in ("token", "sequence")
        if tasks[task]
    }
    return {"probe_tasks": tasks, "downstream_probe_f1": figures}


def planted(args: argparse.Namespace, tmp: Path) -> dict:
    """A small crosscoder per planted store and seed, scored by recovery of the truth."""
    data = yaml.safe_load((REPO / "manifests/harvest/planted.yaml").read_text())
    source = harvest.run(HarvestManifest.model_validate(data), tmp / "planted-src")
    stores, throughput = derive(ActivationStore(source.path), tmp / "planted")
    small = {
        "crosscoder": (
            {"kind": "crosscoder", "n_latents": 256, "activation": "topk", "k": 8},
            PLANTED_LR,
        )
    }
    planted_args = argparse.Namespace(**{**vars(args), "steps": args.planted_steps})
    trained = train_all(stores, small, planted_args, tmp / "planted-runs")
    truth = stores["bfloat16"]
    return {
        "planted_convert_throughput": throughput,
        "planted_recovery_mmcs": per_run(trained, lambda run: recovery(run, truth)),
    }


class Phases:
    """Wall seconds and load average per phase (a shared machine's figures need them); the
    figures so far are written after each phase, marked incomplete until the last."""

    def __init__(self, result: dict, out: Path) -> None:
        self.result, self.out = result, out
        self.result["phases"] = {}
        self.last = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        self.result["phases"][name] = {"seconds": seconds, "load_average": common.load_average()}
        print(f"{name}: {seconds:.0f} s", flush=True)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.result, indent=1) + "\n")


def store_part(stores: dict, args: argparse.Namespace) -> dict:
    """Bytes, decode speed and added error of each dtype's store."""
    out: dict = {"bytes": {d: store_bytes(s) for d, s in stores.items()}}
    base = out["bytes"]["bfloat16"]["bytes_per_token_layer"]
    for d in QUANTISED:
        out["bytes"][d]["vs_bf16"] = out["bytes"][d]["bytes_per_token_layer"] / base
    out["decode"] = decode_rates(stores)
    print(json.dumps(out, indent=1), flush=True)
    return out | quality(stores, stores["bfloat16"].read(0, args.error_tokens).numpy())


def main() -> None:
    args = arguments()
    if args.table:
        result = json.loads(args.out.read_text())
        if args.more_seeds:
            result = pool_seeds(result, json.loads(args.more_seeds.read_text()))
        print(markdown(result), end="")
        return
    if args.threads:  # one thread: a shared CPU stalls torch's OpenMP team at every barrier
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result: dict = {
        "complete": False,
        "parts": args.parts,
        "device": common.device_name(torch.device("cpu")),
        "load_average_start": common.load_average(),
        "recipe": recipe(args),
    }
    phases = Phases(result, args.out)
    with tempfile.TemporaryDirectory(prefix="fmx-storage-bench-") as tmp:
        tmp = Path(tmp)
        if "harvest" in args.parts:
            result["harvest_throughput"] = harvest_rates(
                args.harvest_tokens, args.harvest_rounds, tmp / "harvest"
            )
            phases.done("harvest throughput")
        if {"store", "downstream"} & set(args.parts):
            source = harvest_real(args.tokens)
            stores, result["convert_throughput"] = derive(source, tmp / "cache")
            phases.done("bf16 store, copy and convert")
        if "store" in args.parts:
            result |= store_part(stores, args)
            phases.done("bytes, decode, added error")
        if "downstream" in args.parts:
            trained = train_all(stores, coders(args), args, tmp / "runs")
            result["loader"] = loader_records(trained)
            phases.done("train")
            x = test_activations(stores["bfloat16"])
            result["downstream_test_fvu"] = per_run(trained, lambda run: test_fvu(run, x))
            phases.done("test FVU")
            result |= probe_figures(trained, stores["bfloat16"])
            phases.done("probe F1")
        if "planted" in args.parts:
            result |= planted(args, tmp)
            phases.done("planted")
    result["complete"] = True
    result["wall_seconds"] = time.perf_counter() - started
    result["load_average_end"] = common.load_average()
    phases.done("end")
    print(f"wrote {args.out} in {result['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
