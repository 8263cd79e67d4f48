"""SAELens side of bench/vs_saelens.py; runs inside SAELens's own venv, never ours.

SAELens 6.x pins transformer-lens < 4, so it cannot share the project environment;
bench/vs_saelens.py builds `.bench-venv-saelens/` and runs this file with its python.
It imports nothing from the project (only the standard library, numpy, torch, datasets,
transformers, transformer_lens and sae_lens) and talks to the caller through files:

* in: ``--windows`` an int32 ``.npy`` of token windows ``[n_windows, context]`` (exactly
  the windows our harvest stored), ``--model-dir`` the dequantised SmolLM2 as a plain HF
  Llama directory;
* out: ``--json-out`` the figures, and ``--check-dir`` the first ``--check-windows``
  windows of every cached layer (``layer<L>.npy``, float32, plus ``token_ids<L>.npy``)
  so the caller can check both sides computed the same activations for the same tokens.

1. harvest: ``CacheActivationsRunner`` once per layer (it takes one hook per run), over the
   windows passed as ``override_dataset``; the model is loaded once through SAELens's own
   loader (``sae_lens.load_model.load_model`` -> ``HookedTransformer.from_pretrained_no_
   processing``) and handed to every runner by patching the runner's ``load_model``;
2. reader: ``ActivationsStore`` reading one layer's cache (``cached_activations_path``)
   through its mixing buffer (shuffling on), in training batches of ``--train-batch``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def load_tl_model(model_dir: str, device: str):
    """SmolLM2 through SAELens's own loader, offline, from the local HF Llama directory.

    transformer-lens 3.x does not list SmolLM2 among its official models and insists on an
    official name; a local directory with a config.json is otherwise supported (its config
    is read from there), so the directory is registered as a name of its own. The HF model
    is loaded from the same directory and passed as ``hf_model`` (no hub access).
    """
    import transformer_lens.loading_from_pretrained as loading
    from sae_lens.load_model import load_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_dir not in loading.OFFICIAL_MODEL_NAMES:
        loading.OFFICIAL_MODEL_NAMES.append(model_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return load_model(
        "HookedTransformer",
        model_dir,
        device=device,
        model_from_pretrained_kwargs={"hf_model": hf_model, "tokenizer": tokenizer},
    )


def buffer_size_gb(n_tokens: int, bytes_per_token: int) -> float:
    """A buffer of exactly ``n_tokens`` (at most SAELens's 2 GB default).

    With the default 2 GB the runner rounds the token count up to whole 2 GB buffers,
    computing (and storing) far more tokens than asked for.
    """
    return min(2.0, (n_tokens * bytes_per_token + bytes_per_token / 2) / 1e9)


def harvest_layer(args, model, dataset, layer: int, path: Path, dtype: str) -> dict:
    import sae_lens.cache_activations_runner as runner_module
    from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig

    n_tokens = args.n_windows * args.context
    hook = f"blocks.{layer}.hook_resid_post"
    bytes_per_token = args.d_model * torch.empty((), dtype=getattr(torch, dtype)).itemsize
    cfg = CacheActivationsRunnerConfig(
        dataset_path="fmx-token-windows (override_dataset)",
        model_name=args.model_dir,
        model_batch_size=args.batch,
        hook_name=hook,
        d_in=args.d_model,
        training_tokens=n_tokens,
        context_size=args.context,
        new_cached_activations_path=str(path),
        dtype=dtype,
        device="cpu",
        buffer_size_gb=buffer_size_gb(n_tokens, bytes_per_token),
        prepend_bos=True,  # our windows already start with BOS; pre-tokenised rows are fed as is
        shuffle=True,  # the default
        seed=42,
    )
    if cfg.n_buffers * cfg.n_tokens_in_buffer != n_tokens:
        raise SystemExit(
            f"SAELens would cache {cfg.n_buffers} x {cfg.n_tokens_in_buffer} tokens, not "
            f"{n_tokens}: pick --tokens as a multiple of batch x context"
        )

    def preloaded(**kwargs):
        if kwargs.get("model_name") != args.model_dir:
            raise RuntimeError(f"unexpected model request {kwargs}")
        return model

    runner_module.load_model = preloaded  # the runner has no argument for a loaded model
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runner = CacheActivationsRunner(cfg, override_dataset=dataset)
        init_s = time.perf_counter() - started
        started = time.perf_counter()
        runner.run()
        run_s = time.perf_counter() - started
    files = sorted(p for p in path.rglob("*") if p.is_file())
    arrow = [p for p in files if p.name.startswith("data-") and p.suffix == ".arrow"]
    return {
        "layer": layer,
        "hook": hook,
        "dtype": dtype,
        "init_seconds": init_s,
        "run_seconds": run_s,
        "n_buffers": cfg.n_buffers,
        "tokens_in_buffer": cfg.n_tokens_in_buffer,
        "bytes_total": sum(p.stat().st_size for p in files),
        "bytes_arrow_data": sum(p.stat().st_size for p in arrow),
        "files": [str(p.relative_to(path)) for p in files],
        "path": str(path),
    }


def dump_check(args, layer_info: dict, check_dir: Path) -> None:
    """The first windows of the cache in its on-disk order, for the caller's equality check."""
    import datasets

    ds = datasets.load_from_disk(layer_info["path"]).with_format("numpy")
    rows = ds[: args.check_windows]
    layer = layer_info["layer"]
    np.save(check_dir / f"layer{layer}.npy", np.asarray(rows[layer_info["hook"]], np.float32))
    np.save(check_dir / f"token_ids{layer}.npy", np.asarray(rows["token_ids"], np.int32))


def read_throughput(args, layer_info: dict, buffer_batches: int) -> dict:
    """SAELens's training-time read path over one layer's cache, mixing buffer on.

    ``ActivationsStore`` is built as ``ActivationsStore.from_config`` builds it for
    training from cached activations (``use_cached_activations``), with SAELens's defaults
    for everything but ``n_batches_in_buffer``: its mixing buffer holds
    ``n_batches_in_buffer * context`` tokens and must hold at least one training batch
    (the default 20 gives 2560 < 4096 at context 128, which raises).
    """
    from sae_lens.training.activations_store import ActivationsStore

    n_tokens = args.n_windows * args.context
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "samples exhausted, beginning new epoch"
        started = time.perf_counter()
        store = ActivationsStore(
            model=None,  # unused when reading a cache
            dataset=None,
            streaming=False,
            hook_name=layer_info["hook"],
            hook_head_index=None,
            context_size=args.context,
            d_in=args.d_model,
            n_batches_in_buffer=buffer_batches,
            total_training_tokens=n_tokens,
            store_batch_size_prompts=args.store_batch_prompts,
            train_batch_size_tokens=args.train_batch,
            prepend_bos=True,
            normalize_activations="none",
            device=torch.device("cpu"),
            dtype=args.dtype,
            cached_activations_path=layer_info["path"],
            activations_mixing_fraction=0.5,
        )
        open_s = time.perf_counter() - started
        batches = math.ceil(args.reader_epochs * n_tokens / args.train_batch)
        rates = []
        for _ in range(args.reader_repeats):  # one stream, timed in slices of `batches`
            rows = 0
            started = time.perf_counter()
            for _ in range(batches):
                batch = store.next_batch()
                rows += int(batch.shape[0])
            read_s = time.perf_counter() - started
            rates.append(rows / read_s)
    return {
        "layer": layer_info["layer"],
        "n_batches_in_buffer": buffer_batches,
        "mixing_buffer_tokens": buffer_batches * args.context,
        "store_batch_size_prompts": args.store_batch_prompts,
        "train_batch_size_tokens": args.train_batch,
        "batch_shape": list(batch.shape),
        "batch_dtype": str(batch.dtype),
        "batches": batches,
        "rows": rows,
        "open_seconds": open_s,
        "repeats": args.reader_repeats,
        "layer_rows_per_s_repeats": rates,
        "layer_rows_per_s": statistics.median(rates),
    }


def versions() -> dict:
    from importlib.metadata import version

    names = ["sae-lens", "transformer-lens", "transformers", "datasets", "torch", "numpy"]
    return {name: version(name) for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", required=True, help="int32 .npy [n_windows, context]")
    parser.add_argument("--model-dir", required=True, help="plain HF Llama directory")
    parser.add_argument("--layers", required=True, help="comma-separated block indices")
    parser.add_argument("--cache-root", required=True, help="empty directory for the caches")
    parser.add_argument("--json-out", required=True)
    parser.add_argument("--check-dir", required=True)
    parser.add_argument("--check-windows", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="model batch (windows)")
    parser.add_argument("--dtype", default="float32", help="SAELens cache dtype (default fp32)")
    parser.add_argument("--train-batch", type=int, default=4096, help="reader batch (tokens)")
    parser.add_argument("--store-batch-prompts", type=int, default=32, help="SAELens default")
    parser.add_argument(
        "--buffer-batches",
        default="64",
        help="comma-separated n_batches_in_buffer values for the reader (0: the whole cache)",
    )
    parser.add_argument(
        "--bytes-only-dtypes",
        default="",
        help="comma-separated extra cache dtypes (e.g. float16) for one layer, bytes only",
    )
    parser.add_argument("--reader-epochs", type=float, default=4, help="cache passes per repeat")
    parser.add_argument("--reader-repeats", type=int, default=5, help="median of these")
    parser.add_argument("--reader-layer-index", type=int, default=0)
    parser.add_argument("--keep-caches", action="store_true")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from datasets import Dataset, Features, Sequence, Value

    windows = np.load(args.windows).astype(np.int32)
    args.n_windows, args.context = windows.shape
    layers = [int(x) for x in args.layers.split(",")]
    cache_root = Path(args.cache_root)
    check_dir = Path(args.check_dir)
    cache_root.mkdir(parents=True, exist_ok=True)
    check_dir.mkdir(parents=True, exist_ok=True)
    figures: dict = {
        "python": sys.version.split()[0],
        "versions": versions(),
        "torch_threads": torch.get_num_threads(),
        "host": platform.node(),
        "n_windows": args.n_windows,
        "context": args.context,
        "tokens": int(windows.size),
        "dtype": args.dtype,
        "model_batch_windows": args.batch,
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }

    started = time.perf_counter()
    model = load_tl_model(args.model_dir, "cpu")
    figures["model_load_seconds"] = time.perf_counter() - started
    args.d_model = int(model.cfg.d_model)
    figures["d_model"] = args.d_model
    figures["model_n_layers"] = int(model.cfg.n_layers)

    dataset = Dataset.from_dict(
        {"input_ids": windows.tolist()},
        features=Features({"input_ids": Sequence(Value("int32"), length=args.context)}),
    )
    per_layer = []
    for layer in layers:
        info = harvest_layer(args, model, dataset, layer, cache_root / f"layer{layer}", args.dtype)
        if args.check_windows:
            dump_check(args, info, check_dir)
        per_layer.append(info)
        rate = windows.size / info["run_seconds"]
        print(f"saelens: layer {layer}: {rate:.1f} tok/s (one hook per run)", flush=True)
    figures["harvest_per_layer"] = per_layer
    run_s = sum(x["run_seconds"] for x in per_layer)
    init_s = sum(x["init_seconds"] for x in per_layer)
    figures["harvest_run_seconds"] = run_s
    figures["harvest_init_seconds"] = init_s
    figures["harvest_tokens_per_s"] = windows.size / run_s
    figures["harvest_wall_tokens_per_s"] = windows.size / (
        run_s + init_s + figures["model_load_seconds"]
    )
    token_layers = windows.size * len(layers)
    figures["bytes_per_token_layer"] = sum(x["bytes_total"] for x in per_layer) / token_layers
    figures["bytes_per_token_layer_arrow_data"] = (
        sum(x["bytes_arrow_data"] for x in per_layer) / token_layers
    )
    figures["load_average_after_harvest"] = [round(x, 2) for x in os.getloadavg()]

    # Bytes only: the first layer again with another cache dtype (Arrow has no bfloat16).
    extra = []
    for dtype in filter(None, args.bytes_only_dtypes.split(",")):
        path = cache_root / f"bytes-only-{dtype}-layer{layers[0]}"
        info = harvest_layer(args, model, dataset, layers[0], path, dtype)
        info["bytes_per_token_layer"] = info["bytes_total"] / windows.size
        info["bytes_per_token_layer_arrow_data"] = info["bytes_arrow_data"] / windows.size
        extra.append(info)
        print(
            f"saelens: {dtype} cache of layer {layers[0]}: "
            f"{info['bytes_per_token_layer']:.1f} B per token-layer",
            flush=True,
        )
    figures["bytes_only_dtypes"] = extra
    del model

    reader_info = per_layer[args.reader_layer_index]
    readers = []
    for value in (int(x) for x in filter(None, args.buffer_batches.split(","))):
        buffer_batches = value or args.n_windows  # 0: the whole cache in the buffer
        reading = read_throughput(args, reader_info, buffer_batches)
        readers.append(reading)
        print(
            f"saelens: reader, mixing buffer {reading['mixing_buffer_tokens']} tokens: "
            f"{reading['layer_rows_per_s'] / 1e6:.3f}M layer-rows/s",
            flush=True,
        )
    figures["reader"] = readers
    figures["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    if not args.keep_caches:
        shutil.rmtree(cache_root, ignore_errors=True)
    Path(args.json_out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
