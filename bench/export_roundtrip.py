"""Round trip of ``pipeline export`` through the real libraries: SAELens and dictionary_learning.

1. harvest a tiny store (random 4-layer model, real text) into a temporary cache root;
2. train per-layer SAEs (relu, topk, batchtopk, jumprelu) and crosscoders / fmxcoders
   (relu, topk, batchtopk; factorised weights) for a few steps;
3. export each (``saelens`` / ``dictionary_learning``) and compute our reconstruction of
   raw held-out rows (``denormalise(coder(normalise(x)))``);
4. in SAELens's own venv (``.bench-venv-saelens``, built as bench/vs_saelens.py builds it),
   ``bench/export_roundtrip_side.py`` loads each export with ``SAE.load_from_disk`` or
   dictionary_learning's ``CrossCoder.from_pretrained`` and runs the library's forward;
5. both sides must agree to 1e-4 (``allclose(atol=1e-4, rtol=1e-4)``); so must our
   re-implementations of the libraries' forwards (``pipeline.training.export``), which CI runs.

dictionary_learning's crosscoder classes are not in the ``dictionary-learning`` wheel on
PyPI (0.1.0); they live in the maintained fork github.com/jkminder/dictionary_learning.
Pass its package directory with ``--dictionary-learning-src`` to check against the real
class; without it the dictionary_learning side is checked by our re-implementation only,
and the results file says so.

    python bench/export_roundtrip.py
    python bench/export_roundtrip.py --dictionary-learning-src ~/src/dl/dictionary_learning
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
from vs_saelens import SAELENS_VENV, _clean_env, ensure_saelens_venv

from pipeline.manifests.harvest import HarvestManifest
from pipeline.store.reader import ActivationStore
from pipeline.training.checkpoint import load_coder
from pipeline.training.export import dictionary_learning_forward, export_run, saelens_forward
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
VARIANTS: dict[str, tuple[str, dict]] = {
    "sae-relu": (
        "saelens",
        {
            "kind": "per_layer_sae",
            "latents_per_layer": 128,
            "activation": "relu",
            "l1_coefficient": 0.01,
        },
    ),
    "sae-topk": (
        "saelens",
        {"kind": "per_layer_sae", "latents_per_layer": 128, "activation": "topk", "k": 8},
    ),
    "sae-batchtopk": (
        "saelens",
        {"kind": "per_layer_sae", "latents_per_layer": 128, "activation": "batchtopk", "k": 8},
    ),
    "sae-jumprelu": (
        "saelens",
        {
            "kind": "per_layer_sae",
            "latents_per_layer": 128,
            "activation": "jumprelu",
            "l0_coefficient": 0.01,
        },
    ),
    "crosscoder-relu": (
        "dictionary_learning",
        {"kind": "crosscoder", "n_latents": 256, "activation": "relu", "l1_coefficient": 0.01},
    ),
    "crosscoder-topk": (
        "dictionary_learning",
        {"kind": "crosscoder", "n_latents": 256, "activation": "topk", "k": 16},
    ),
    "fmxcoder-batchtopk": (
        "dictionary_learning",
        {
            "kind": "fmxcoder",
            "n_latents": 256,
            "activation": "batchtopk",
            "k": 16,
            "rank": 2,
            "masking_probability": 0.3,
            **FMX,
        },
    ),
    "fmxcoder-topk": (
        "dictionary_learning",
        {"kind": "fmxcoder", "n_latents": 256, "activation": "topk", "k": 16, "rank": 2, **FMX},
    ),
}
ATOL = RTOL = 1e-4


def compare(theirs: torch.Tensor, ours: torch.Tensor) -> dict:
    err = (theirs - ours).abs()
    return {
        "max_abs_error": float(err.max()),
        "max_abs_value": float(ours.abs().max()),
        "max_relative_error": float(err.max() / ours.abs().max().clamp_min(1e-30)),
        "ok": bool(torch.allclose(theirs, ours, atol=ATOL, rtol=RTOL)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=512, help="held-out rows compared")
    parser.add_argument("--dictionary-learning-src", type=Path, default=None)
    parser.add_argument("--saelens-version", default="6.54.12")
    parser.add_argument("--torch-spec", default="torch==2.13.0")
    parser.add_argument("--venv", type=Path, default=SAELENS_VENV)
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench/results/export_roundtrip-cpu.json"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="fmx-export-roundtrip-"))
    store_path = harvest.run(HarvestManifest.model_validate(TINY_STORE), work / "cache").path
    store = ActivationStore(store_path)
    manifests = [
        (
            CoderManifest.model_validate(
                {
                    "name": name,
                    "cache": {"key": store.key, "root": str(work / "cache")},
                    "coder": spec,
                    "training": {"tokens": 8192, "batch_size": 256, "lr": 1e-3},
                    "run": {"runs_root": str(work / "runs"), "progress": False},
                }
            ),
            REPO,
        )
        for name, (_, spec) in VARIANTS.items()
    ]
    results = {r.name: r.run_dir for r in train.run(manifests)}
    rows = split_rows(store, "test")[: args.rows]
    x = torch.cat([store.read(int(r), int(r) + 1) for r in rows])  # raw [rows, L, d]
    save_file({"x": x.contiguous()}, str(work / "inputs.safetensors"))
    plan, ours, report = {}, {}, {}
    for name, (fmt, _) in VARIANTS.items():
        final = results[name] / "final"
        folders = export_run(final, fmt, work / "export" / name)
        record = read_record(final)
        coder = load_coder(final)
        with torch.no_grad():
            ours[name] = record.denormalise(coder(record.normalise(x)))
        if fmt == "saelens":
            mine = torch.stack([saelens_forward(f, x[:, j]) for j, f in enumerate(folders)], 1)
        else:
            mine = dictionary_learning_forward(folders[0], x)
        plan[name] = {
            "format": fmt,
            "folder": str(work / "export" / name),
            "hooks": record.hook_names,
        }
        report[name] = {
            "format": fmt,
            "activation": VARIANTS[name][1]["activation"],
            "reimplementation": compare(mine, ours[name]),
        }
    (work / "plan.json").write_text(json.dumps(plan, indent=2))
    python = ensure_saelens_venv(args.venv, args.saelens_version, args.torch_spec, False)
    cmd = [str(python), str(SIDE), str(work)]
    if args.dictionary_learning_src:
        cmd += ["--dictionary-learning-src", str(args.dictionary_learning_src)]
    subprocess.run(cmd, env=_clean_env(), check=True, timeout=1800)
    side = json.loads((work / "side.json").read_text())
    for name in VARIANTS:
        theirs_file = work / "theirs" / f"{name}.safetensors"
        if theirs_file.is_file():
            theirs = load_file(str(theirs_file))["y"]
            report[name]["library"] = {"how": side["runs"][name], **compare(theirs, ours[name])}
        else:
            report[name]["library"] = {
                "how": "not run: pass --dictionary-learning-src (no crosscoder class on PyPI)"
            }
    checked = [r["library"] for r in report.values() if "ok" in r["library"]]
    result = {
        "benchmark": "export_roundtrip",
        "command": " ".join(["python", *sys.argv]),
        "device": device_name(torch.device("cpu")),
        "load_average": load_average(),
        "rows": len(rows),
        "tolerance": {"atol": ATOL, "rtol": RTOL},
        "libraries": {k: v for k, v in side.items() if k != "runs"},
        "dictionary_learning_source": str(args.dictionary_learning_src or ""),
        "variants": report,
        "all_ok": all(r["ok"] for r in checked)
        and all(r["reimplementation"]["ok"] for r in report.values()),
        "library_checks": len(checked),
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, r in report.items():
        lib = r["library"]
        print(
            f"{name:<20} ours-reimpl err {r['reimplementation']['max_abs_error']:.2e}  "
            f"library err {lib.get('max_abs_error', float('nan')):.2e}  {lib['how']}"
        )
    print(f"all ok: {result['all_ok']}  -> {args.out}")
    if not result["all_ok"]:
        sys.exit(f"mismatch: inputs and exports kept in {work}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
