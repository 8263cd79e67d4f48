"""Coder checkpoints and training state as safetensors + JSON (never pickle), written atomically.

A coder checkpoint is a directory holding ``coder.safetensors`` (the state dict) and
``coder.json`` (the resolved config, caller metadata and the weights' SHA-256). Each file is
written to a temporary name, fsynced and ``os.replace``d, so a crash never leaves a partial
file; the hash catches the one remaining window (new weights beside an old JSON).

Training state (optimizer, RNG) is one safetensors file whose header carries the JSON:
``flatten_state`` turns any nested dict/list/tuple of tensors and scalars (an optimizer's
``state_dict()``) into named tensors plus a JSON skeleton, and ``unflatten_state`` inverts it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from pipeline.assets import sha256_file
from pipeline.coders import SparseCoder, build_coder, coder_config_from_dict
from pipeline.store_format import atomic_write, atomic_write_json

WEIGHTS_FILE = "coder.safetensors"
CONFIG_FILE = "coder.json"
FORMAT = "fmxcoders-coder/1"


def _write_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    save_file(tensors, str(path), metadata=metadata)


def _cpu_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def save_coder(
    path_dir: Path, coder: SparseCoder, extra_json: dict[str, Any] | None = None
) -> Path:
    """Write ``coder`` (weights, buffers, resolved config) into ``path_dir``; returns it."""
    path_dir = Path(path_dir)
    path_dir.mkdir(parents=True, exist_ok=True)
    weights = path_dir / WEIGHTS_FILE
    tensors = _cpu_tensors(coder.state_dict())
    meta = {"format": FORMAT, "kind": coder.config.kind}
    atomic_write(weights, lambda tmp: _write_safetensors(tensors, tmp, meta))
    doc = {
        "format": FORMAT,
        "config": coder.config.model_dump(mode="json"),
        "weights_sha256": sha256_file(weights),
        "extra": extra_json or {},
    }
    atomic_write_json(path_dir / CONFIG_FILE, doc)
    return path_dir


def read_coder_json(path_dir: Path) -> dict[str, Any]:
    """The checkpoint's JSON document (``config``, ``extra``, ``weights_sha256``)."""
    doc = json.loads((Path(path_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path_dir}: not a coder checkpoint (format {doc.get('format')!r})")
    return doc


def load_coder(
    path_dir: Path, device: str | torch.device = "cpu", verify: bool = True
) -> SparseCoder:
    """Rebuild a coder from ``save_coder``'s output, on ``device``, in eval mode."""
    path_dir = Path(path_dir)
    doc = read_coder_json(path_dir)
    weights = path_dir / WEIGHTS_FILE
    if verify and sha256_file(weights) != doc["weights_sha256"]:
        raise ValueError(
            f"{weights} does not match {path_dir / CONFIG_FILE} (hash mismatch): the checkpoint "
            "was interrupted between its two files; re-save it or use an older checkpoint"
        )
    coder = build_coder(coder_config_from_dict(doc["config"]))
    coder.load_state_dict(load_file(str(weights)), strict=True)
    return coder.to(device).eval()


def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, Tensor], Any]:
    """Split a nested structure into ``{name: tensor}`` and a JSON-able skeleton."""
    tensors: dict[str, Tensor] = {}

    def enc(o: Any, path: str) -> Any:
        if isinstance(o, Tensor):
            tensors[path] = o.detach().to("cpu").contiguous()
            return {"__tensor__": path}
        if isinstance(o, dict):  # a list of pairs keeps int keys (optimizer param ids) as ints
            return {"__dict__": [[k, enc(v, f"{path}.{k}")] for k, v in o.items()]}
        if isinstance(o, tuple):
            return {"__tuple__": [enc(v, f"{path}.{i}") for i, v in enumerate(o)]}
        if isinstance(o, list):
            return [enc(v, f"{path}.{i}") for i, v in enumerate(o)]
        if o is None or isinstance(o, bool | int | float | str):
            return o
        raise TypeError(f"cannot store {type(o).__name__} at {path!r} without pickle")

    return tensors, enc(obj, prefix)


def unflatten_state(tensors: dict[str, Tensor], skeleton: Any) -> Any:
    """Invert ``flatten_state``."""

    def dec(o: Any) -> Any:
        if isinstance(o, list):
            return [dec(v) for v in o]
        if isinstance(o, dict):
            if "__tensor__" in o:
                return tensors[o["__tensor__"]]
            if "__tuple__" in o:
                return tuple(dec(v) for v in o["__tuple__"])
            return {k: dec(v) for k, v in o["__dict__"]}
        return o

    return dec(skeleton)


def save_training_state(path: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """One safetensors file: ``tensors`` as data, ``meta`` as JSON in the header."""
    data = _cpu_tensors(tensors)
    header = {"meta": json.dumps(meta, sort_keys=True)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(path), lambda tmp: _write_safetensors(data, tmp, header))


def load_training_state(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads((fh.metadata() or {}).get("meta", "{}"))
    return load_file(str(path)), meta


def capture_rng_states(
    generators: dict[str, torch.Generator] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """torch CPU/CUDA, numpy, Python ``random`` and named generators, as tensors + JSON."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    for name, g in (generators or {}).items():
        tensors[f"rng.generator.{name}"] = g.get_state()
    py_version, py_state, py_gauss = random.getstate()
    tensors["rng.python"] = torch.tensor(py_state, dtype=torch.int64)
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np_keys.astype(np.int64))
    meta = {
        "python": [py_version, py_gauss],
        "numpy": [np_name, int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    return tensors, meta


def restore_rng_states(
    tensors: dict[str, Tensor],
    meta: dict[str, Any],
    generators: dict[str, torch.Generator] | None = None,
) -> None:
    """Inverse of ``capture_rng_states`` (CUDA states only for devices present now)."""
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"rng.cuda.{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"rng.cuda.{i}"], i)
    for name, g in (generators or {}).items():
        g.set_state(tensors[f"rng.generator.{name}"])
    py_version, py_gauss = meta["python"]
    random.setstate((py_version, tuple(tensors["rng.python"].tolist()), py_gauss))
    np_name, np_pos, np_has_gauss, np_gauss = meta["numpy"]
    keys = tensors["rng.numpy"].numpy().astype(np.uint32)
    np.random.set_state((np_name, keys, np_pos, np_has_gauss, np_gauss))
