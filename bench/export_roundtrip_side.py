"""The SAELens (and dictionary_learning) side of bench/export_roundtrip.py.

Runs in SAELens's own venv (``.bench-venv-saelens``), never ours: loads each exported
folder with the real library, runs its forward on the raw inputs the main script saved,
and writes the reconstructions to ``<work>/theirs/<name>.safetensors``.

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
    from sae_lens import SAE

    outs = []
    for layer, hook in enumerate(hooks):
        sae = SAE.load_from_disk(folder / hook, device="cpu")
        with torch.no_grad():
            outs.append(sae(x[:, layer]))
    return torch.stack(outs, 1)


def dictionary_learning_outputs(dl, folder: Path, x: torch.Tensor) -> tuple[torch.Tensor, str]:
    provenance = json.loads((folder / "fmxcoders.json").read_text())
    cls = getattr(dl, provenance["class"])
    model = cls.from_pretrained(str(folder), from_hub=True).eval()
    with torch.no_grad():
        if provenance["per_token_topk"]:  # BatchTopK over one token is per-token TopK
            rows = [
                model.decode(model.encode(x[i : i + 1], use_threshold=False)) for i in range(len(x))
            ]
            return torch.cat(rows), f"{provenance['class']}.encode(use_threshold=False) per token"
        return model(x), f"{provenance['class']}.forward"


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
            y, how = (
                saelens_outputs(folder, entry["hooks"], x),
                "sae_lens.SAE.load_from_disk + forward",
            )
        elif dl is not None:
            y, how = dictionary_learning_outputs(dl, folder, x)
        else:
            continue
        save_file({"y": y.contiguous()}, str(out / f"{name}.safetensors"))
        report["runs"][name] = how
        print(f"{name}: {how}", flush=True)
    (args.work / "side.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
