"""Round trip of ``pipeline export`` through the real libraries: SAELens and dictionary_learning.

For each store asked for (``--store tiny``: a random 4-layer model harvested into a temporary
cache; ``--store KEY``: an existing cache, e.g. SmolLM2-135M's cpu-large 13797ab9fcf34098):

1. train per-layer SAEs (relu, topk, batchtopk, jumprelu) and crosscoders / fmxcoders
   (relu, topk, batchtopk; factorised weights) briefly, into a private runs directory;
2. export each (``saelens`` / ``dictionary_learning``; a TopK crosscoder's threshold is
   estimated on the store's training split) and compute our reconstruction of raw
   held-out rows (``denormalise(coder(normalise(x)))``), outlier tokens excluded as in
   training;
3. in SAELens's own venv (``.bench-venv-saelens``, built as bench/vs_saelens.py builds it),
   ``bench/export_roundtrip_side.py`` loads each export and runs the calls docs/export.md
   documents, as written there: ``sae(resid)``, ``cc(x)``, and for TopK exports the
   per-token ``encode(use_threshold=False)`` loop;
4. exact calls must agree with ours to 1e-4 of the largest reconstructed value (raw units:
   errors are reported as such, with the data's RMS); a TopK export's ``cc(x)`` (a
   threshold, not per-token TopK: an approximation) must fire k latents per token within
   25%, and its FVU of the raw data is reported beside ours. Our re-implementations of the
   libraries' forwards (``pipeline.training.export``, which CI runs) are checked the same
   way.

dictionary_learning's crosscoder classes are not in the ``dictionary-learning`` wheel on
PyPI (0.1.0); they live in the maintained fork github.com/jkminder/dictionary_learning.
Pass its package directory with ``--dictionary-learning-src`` to check against the real
class; without it the dictionary_learning side is checked by our re-implementation only,
and the results file says so.

    python bench/export_roundtrip.py --store tiny --store 13797ab9fcf34098 \
        --dictionary-learning-src ~/src/dl/dictionary_learning
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import device_name, load_average
from safetensors.torch import load_file, save_file
from vs_saelens import SAELENS_VENV, _clean_env, _run_logged, ensure_saelens_venv

from pipeline.manifests.harvest import HarvestManifest
from pipeline.store.catalog import find_store, model_facts
from pipeline.store.outliers import DEFAULT_RATIO, excluded_rows, outlier_scan
from pipeline.store.reader import ActivationStore
from pipeline.training.checkpoint import load_coder
from pipeline.training.export import (
    dictionary_learning_codes,
    dictionary_learning_forward,
    export_run,
    saelens_forward,
)
from pipeline.training.loader import split_rows
from pipeline.training.manifest import CoderManifest
from pipeline.training.run_record import read_record
from stages import harvest, train

REPO = Path(__file__).resolve().parents[1]
SIDE = REPO / "bench" / "export_roundtrip_side.py"
TINY_STORE = {
    "model": {"source": "random", "n_layers": 4, "d_model": 64, "seed": 0},
    "text": {"source": "wiki_summaries", "languages": ["en"]},
    "tokenization": {"context_length": 32, "num_tokens": 4096},
    "storage": {"chunk_tokens": 512},
    "run": {"progress": False},
}
FMX = {"encoder_factorization": "shared_basis", "decoder_factorization": "shared_basis"}
TOL = 1e-4  # exact calls: max |theirs - ours| <= TOL * max |ours| (raw units)
L0_TOL = 0.25  # a TopK export's cc(x) fires k latents per token within 25% (-1 fired ~m/2)


def variants(sae_latents: int, latents: int, k_sae: int, k: int) -> dict[str, tuple[str, dict]]:
    """The coders the bench trains: every activation each format takes, at these sizes."""
    sae = {"kind": "per_layer_sae", "latents_per_layer": sae_latents}
    cc = {"kind": "crosscoder", "n_latents": latents}
    fmx = {"kind": "fmxcoder", "n_latents": latents, "rank": 2, **FMX}
    return {
        "sae-relu": ("saelens", {**sae, "activation": "relu", "l1_coefficient": 0.01}),
        "sae-topk": ("saelens", {**sae, "activation": "topk", "k": k_sae}),
        "sae-batchtopk": ("saelens", {**sae, "activation": "batchtopk", "k": k_sae}),
        "sae-jumprelu": ("saelens", {**sae, "activation": "jumprelu", "l0_coefficient": 0.01}),
        "crosscoder-relu": (
            "dictionary_learning",
            {**cc, "activation": "relu", "l1_coefficient": 0.01},
        ),
        "crosscoder-topk": ("dictionary_learning", {**cc, "activation": "topk", "k": k}),
        "fmxcoder-batchtopk": (
            "dictionary_learning",
            {**fmx, "activation": "batchtopk", "k": k, "masking_probability": 0.3},
        ),
        "fmxcoder-topk": ("dictionary_learning", {**fmx, "activation": "topk", "k": k}),
    }


TINY_VARIANTS = variants(128, 256, 8, 16)
STORE_VARIANTS = variants(512, 1024, 16, 32)  # a real model's cache (d_model in the hundreds)


def fvu(x: torch.Tensor, recon: torch.Tensor) -> float:
    """Fraction of the raw data's variance (about its per-layer, per-dimension mean) left."""
    return float(((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def compare(theirs: torch.Tensor, ours: torch.Tensor) -> dict:
    """An exact call's agreement with ours, in raw units."""
    err = (theirs - ours).abs()
    scale = ours.abs().max().clamp_min(1e-30)
    return {
        "max_abs_error": float(err.max()),
        "rms_error": float(err.pow(2).mean().sqrt()),
        "max_abs_value": float(scale),
        "max_relative_error": float(err.max() / scale),
        "ok": bool(err.max() <= TOL * scale),
    }


def compare_threshold(theirs: torch.Tensor, l0: torch.Tensor, ours: torch.Tensor, x, k) -> dict:
    """A TopK export's ``cc(x)`` (threshold at L0 = k on training tokens) against our
    per-token TopK: its L0, and both FVUs of the raw data."""
    ours_fvu, theirs_fvu = fvu(x, ours), fvu(x, theirs)
    mean_l0 = float(l0.mean())
    return {
        "k": k,
        "mean_l0": mean_l0,
        "fvu_ours_per_token_topk": ours_fvu,
        "fvu_theirs": theirs_fvu,
        "fvu_ratio": theirs_fvu / ours_fvu,
        "rms_difference_to_ours": float((theirs - ours).pow(2).mean().sqrt()),
        "ok": abs(mean_l0 / k - 1) <= L0_TOL,
    }


def train_variants(store, cache_root: Path, work: Path, table: dict, tokens: int) -> dict:
    """Train every variant briefly on ``store``; returns name -> run directory."""
    manifests = [
        (
            CoderManifest.model_validate(
                {
                    "name": name,
                    "cache": {"key": store.key, "root": str(cache_root)},
                    "coder": spec,
                    "training": {"tokens": tokens, "batch_size": 256, "lr": 1e-3},
                    "run": {"runs_root": str(work / "runs"), "progress": False},
                }
            ),
            REPO,
        )
        for name, (_, spec) in table.items()
    ]
    return {r.name: r.run_dir for r in train.run(manifests)}


def held_out(store, n: int) -> torch.Tensor:
    """Raw test-split rows ``[n, L, d]`` (the first n), massive-activation tokens excluded
    as training excludes them."""
    scan = outlier_scan(store, DEFAULT_RATIO)
    rows = split_rows(store, "test", exclude=excluded_rows(scan))[:n]
    return store.read(int(rows[0]), int(rows[-1]) + 1)[torch.from_numpy(rows - rows[0])]


def run_store(label: str, store, cache_root: Path, work: Path, args, python: Path) -> dict:
    """Train, export, run both sides on one store; the per-variant report."""
    table = TINY_VARIANTS if label == "tiny" else STORE_VARIANTS
    started = time.perf_counter()
    results = train_variants(store, cache_root, work, table, args.train_tokens)
    x = held_out(store, args.rows)
    save_file({"x": x.contiguous()}, str(work / "inputs.safetensors"))
    plan, ours, report = {}, {}, {}
    for name, (fmt, spec) in table.items():
        final = results[name] / "final"
        folders = export_run(final, fmt, work / "export" / name, cache_root)
        record, coder = read_record(final), load_coder(final)
        with torch.no_grad():
            ours[name] = record.denormalise(coder(record.normalise(x)))
        plan[name] = {"format": fmt, "folder": str(work / "export" / name)}
        plan[name]["hooks"] = record.hook_names
        report[name] = {"format": fmt, "activation": spec["activation"], **exported(folders)}
        calls = reimplementation(fmt, folders, x, ours[name], spec)
        report[name]["reimplementation"] = {"calls": calls}
    (work / "plan.json").write_text(json.dumps(plan, indent=2))
    cmd = [str(python), str(SIDE), str(work)]
    if args.dictionary_learning_src:
        cmd += ["--dictionary-learning-src", str(args.dictionary_learning_src)]
    subprocess.run(cmd, env=_clean_env(), check=True, timeout=3600)
    side = json.loads((work / "side.json").read_text())
    for name, (_, spec) in table.items():
        theirs_file = work / "theirs" / f"{name}.safetensors"
        if not theirs_file.is_file():
            report[name]["library"] = {
                "how": "not run: pass --dictionary-learning-src (no crosscoder class on PyPI)"
            }
            continue
        theirs = load_file(str(theirs_file))
        calls = library(theirs, ours[name], x, spec)
        report[name]["library"] = {"how": side["runs"][name], "calls": calls}
    return {
        "store": store.key,
        "model": model_facts(store.manifest),
        "layers": store.n_layers,
        "d_model": store.d_model,
        "rows": len(x),
        "rms_input": float(x.pow(2).mean().sqrt()),
        "max_abs_input": float(x.abs().max()),
        "train_tokens": args.train_tokens,
        "libraries": {k: v for k, v in side.items() if k != "runs"},
        "variants": report,
        "seconds": round(time.perf_counter() - started, 1),
    }


SAELENS_IDENTITY = (
    "model_name", "gguf_file", "quantisation", "model_class_name", "hook_name", "context_size",
    "prepend_bos", "dataset_path",
)  # fmt: skip


def exported(folders: list[Path]) -> dict:
    """What a user of the export sees: every file's mode, SAELens's model and data fields,
    a TopK crosscoder's threshold estimate."""
    files = [f for folder in folders for f in folder.iterdir()]
    seen: dict = {"file_modes": sorted({oct(f.stat().st_mode & 0o777) for f in files})}
    cfg = folders[0] / "cfg.json"
    if cfg.is_file():
        metadata = json.loads(cfg.read_text())["metadata"]
        seen["saelens_metadata"] = {k: metadata.get(k) for k in SAELENS_IDENTITY}
    provenance = folders[0] / "fmxcoders.json"
    if provenance.is_file() and "threshold_estimate" in json.loads(provenance.read_text()):
        seen["threshold_estimate"] = json.loads(provenance.read_text())["threshold_estimate"]
    return seen


def reimplementation(fmt: str, folders: list[Path], x, ours: torch.Tensor, spec: dict) -> dict:
    """Our re-implementation of the library's documented calls (what CI checks)."""
    if fmt == "saelens":
        mine = torch.stack([saelens_forward(f, x[:, j]) for j, f in enumerate(folders)], 1)
        return {"forward": compare(mine, ours)}
    per_token = json.loads((folders[0] / "fmxcoders.json").read_text())["per_token_topk"]
    forward = dictionary_learning_forward(folders[0], x)
    if not per_token:
        return {"forward": compare(forward, ours)}
    l0 = (dictionary_learning_codes(folders[0], x) > 0).sum(-1).float()
    exact = dictionary_learning_forward(folders[0], x, per_token_topk=True)
    return {
        "forward": compare_threshold(forward, l0, ours, x, spec["k"]),
        "per_token_topk": compare(exact, ours),
    }


def library(theirs: dict[str, torch.Tensor], ours: torch.Tensor, x, spec: dict) -> dict:
    """The real library's documented calls against ours."""
    if "y_per_token_topk" not in theirs:
        return {"forward": compare(theirs["y"], ours)}
    return {
        "forward": compare_threshold(theirs["y"], theirs["l0"], ours, x, spec["k"]),
        "per_token_topk": compare(theirs["y_per_token_topk"], ours),
    }


def checks(report: dict, sides: tuple[str, ...] = ("reimplementation", "library")) -> list:
    """Every call's pass/fail entry in one variant's report."""
    return [c for side in sides for c in report[side].get("calls", {}).values()]


DICTIONARY_LEARNING_DEPS = ("zstandard", "einops")  # its utils.py imports them at the top


def ensure_dictionary_learning_deps(python: Path) -> None:
    """Install what dictionary_learning's ``dictionary.py`` + ``utils.py`` import, and
    SAELens's venv lacks, into that venv (never ours)."""
    probe = [str(python), "-c", f"import {', '.join(DICTIONARY_LEARNING_DEPS)}"]
    if subprocess.run(probe, env=_clean_env(), capture_output=True).returncode:
        pip = [str(python), "-m", "pip", "install", "--progress-bar", "off"]
        _run_logged(
            [*pip, *DICTIONARY_LEARNING_DEPS], "dictionary_learning deps", _clean_env(), 900
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--store",
        action="append",
        default=None,
        help="'tiny' (a random model harvested here) or an existing cache key; repeatable "
        "(default: tiny)",
    )
    parser.add_argument("--rows", type=int, default=512, help="held-out rows compared")
    parser.add_argument("--train-tokens", type=int, default=8192)
    parser.add_argument("--dictionary-learning-src", type=Path, default=None)
    parser.add_argument("--saelens-version", default="6.54.12")
    parser.add_argument("--torch-spec", default="torch==2.13.0")
    parser.add_argument("--venv", type=Path, default=SAELENS_VENV)
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench/results/export_roundtrip-cpu.json"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    python = ensure_saelens_venv(args.venv, args.saelens_version, args.torch_spec, False)
    if args.dictionary_learning_src:
        ensure_dictionary_learning_deps(python)
    work = Path(tempfile.mkdtemp(prefix="fmx-export-roundtrip-"))
    stores = {}
    for label in args.store or ["tiny"]:
        sub = work / label
        if label == "tiny":
            root = sub / "cache"
            store = ActivationStore(
                harvest.run(HarvestManifest.model_validate(TINY_STORE), root).path
            )
        else:
            store = find_store(label)
            root = store.paths.root.parent
        stores[label] = run_store(label, store, root, sub, args, python)
    reports = [v for entry in stores.values() for v in entry["variants"].values()]
    library_checks = [c for v in reports for c in checks(v, ("library",))]
    result = {
        "benchmark": "export_roundtrip",
        "command": " ".join(["python", *sys.argv]),
        "device": device_name(torch.device("cpu")),
        "load_average": load_average(),
        "tolerance": {
            "exact_relative_to_max": TOL,
            "topk_forward_l0": L0_TOL,
        },
        "dictionary_learning_source": str(args.dictionary_learning_src or ""),
        "stores": stores,
        "all_ok": all(c["ok"] for v in reports for c in checks(v)),
        "library_checks": len(library_checks),
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for label, entry in stores.items():
        for name, r in entry["variants"].items():
            print(f"{label:<18} {name:<20} " + summary(r))
    print(f"all ok: {result['all_ok']}  -> {args.out}")
    if not result["all_ok"]:
        sys.exit(f"mismatch: inputs and exports kept in {work}")
    shutil.rmtree(work, ignore_errors=True)


def summary(report: dict) -> str:
    """One line: each call's error (exact) or L0 and FVUs (a TopK export's cc(x))."""
    parts = []
    for side in ("reimplementation", "library"):
        for call, c in report[side].get("calls", {}).items():
            if "mean_l0" in c:
                parts.append(
                    f"{side[:5]}.{call}: L0 {c['mean_l0']:.1f}/{c['k']} "
                    f"FVU {c['fvu_theirs']:.3f} (ours {c['fvu_ours_per_token_topk']:.3f})"
                )
            else:
                parts.append(f"{side[:5]}.{call}: err {c['max_relative_error']:.1e}")
    return "  ".join(parts)


if __name__ == "__main__":
    main()
