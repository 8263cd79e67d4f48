"""The SAELens (and dictionary_learning) side of bench/export_roundtrip.py.

Runs in SAELens's own venv (``.bench-venv-saelens``), never ours: loads each exported
folder with the real library, runs the calls docs/export.md documents (as written there:
tests/test_export.py checks) on the raw inputs the main script saved, and writes the
reconstructions to ``<work>/theirs/<name>.safetensors``.

    python bench/export_roundtrip_side.py WORK [--dictionary-learning-src DIR]
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def dictionary_learning_module(src: Path):
    """dictionary_learning's ``dictionary.py`` (+ ``utils.py``) from a checkout, imported
    as a package without its ``__init__`` (which pulls nnsight and buffers we do not need)."""
    root = Path(tempfile.mkdtemp(prefix="dl-src-"))
    package = root / "dictionary_learning"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("dictionary.py", "utils.py"):
        shutil.copy(src / name, package / name)
    sys.path.insert(0, str(root))
    return importlib.import_module("dictionary_learning.dictionary")


def saelens_outputs(folder: Path, hooks: list[str], x: torch.Tensor) -> torch.Tensor:
    """docs/export.md's SAELens call, as written there, on each layer's raw activations."""
    from sae_lens import SAE

    outs = []
    for layer, hook in enumerate(hooks):
        sae = SAE.load_from_disk(folder / hook, device="cpu")
        resid = x[:, layer]
        with torch.no_grad():
            recon = sae(resid)
        outs.append(recon)
    return torch.stack(outs, 1)


def dictionary_learning_outputs(dl, folder: Path, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """docs/export.md's dictionary_learning calls, as written there: ``cc(x)`` for every
    export (with the codes it keeps, for its L0), and for TopK exports also the per-token
    ``encode(use_threshold=False)`` loop (exact per-token TopK)."""
    provenance = json.loads((folder / "fmxcoders.json").read_text())
    cc = getattr(dl, provenance["class"]).from_pretrained(str(folder), from_hub=True)
    out = {}
    with torch.no_grad():
        recon = cc(x)
        out["y"], out["l0"] = recon, (cc.encode(x) > 0).sum(-1).float()
        if provenance["per_token_topk"]:
            recon = torch.cat([cc.decode(cc.encode(t[None], use_threshold=False)) for t in x])
            out["y_per_token_topk"] = recon
    return out


CALLS = {
    "saelens": "sae = SAE.load_from_disk(folder); recon = sae(resid)",
    "forward": "cc = {cls}.from_pretrained(folder, from_hub=True); recon = cc(x)",
    "per_token_topk": "recon = torch.cat([cc.decode(cc.encode(t[None], "
    "use_threshold=False)) for t in x])",
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("work", type=Path)
    parser.add_argument("--dictionary-learning-src", type=Path, default=None)
    args = parser.parse_args()
    x = load_file(str(args.work / "inputs.safetensors"))["x"]
    plan = json.loads((args.work / "plan.json").read_text())
    dl = (
        dictionary_learning_module(args.dictionary_learning_src)
        if args.dictionary_learning_src
        else None
    )
    out = args.work / "theirs"
    out.mkdir(exist_ok=True)
    report = {"sae-lens": version("sae-lens"), "torch": torch.__version__, "runs": {}}
    for name, entry in plan.items():
        folder = Path(entry["folder"])
        if entry["format"] == "saelens":
            outputs = {"y": saelens_outputs(folder, entry["hooks"], x)}
            how = [CALLS["saelens"]]
        elif dl is not None:
            outputs = dictionary_learning_outputs(dl, folder, x)
            cls = json.loads((folder / "fmxcoders.json").read_text())["class"]
            how = [CALLS["forward"].format(cls=cls)]
            how += [CALLS["per_token_topk"]] if "y_per_token_topk" in outputs else []
        else:
            continue
        tensors = {key: value.contiguous() for key, value in outputs.items()}
        save_file(tensors, str(out / f"{name}.safetensors"))
        report["runs"][name] = how
        print(f"{name}: {how}", flush=True)
    (args.work / "side.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
