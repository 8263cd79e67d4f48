"""Coder checkpoints and training state as safetensors + JSON (never pickle), written atomically.

A coder checkpoint is a directory holding ``coder.safetensors`` (the state dict),
``coder.json`` (the resolved config, caller metadata and the weights' SHA-256), during
training ``optimizer.safetensors`` (optimizer state; the step in its header), and, written
last, ``checksums.json``: the size and SHA-256 of every other file. A directory whose
checksums do not verify is incomplete or damaged and is never loaded as if it were fine.
Each file is written to a temporary name, fsynced and ``os.replace``d, so a crash never
leaves a partial file. Safetensors are written with sorted names and metadata
(``store_format.safetensors_bytes``): the same tensors always give the same bytes.

Training state (optimizer, RNG) is one safetensors file whose header carries the JSON:
``flatten_state`` turns any nested dict/list/tuple of tensors and scalars (an optimizer's
``state_dict()``) into named tensors plus a JSON skeleton, and ``unflatten_state`` inverts it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from pipeline.coders import SparseCoder, build_coder, coder_config_from_dict
from pipeline.store.catalog import (
    CHECKSUMS_FILE,
    CHECKSUMS_FORMAT,
    sealed_dir_problem,
    sha256_file,
)
from pipeline.store.format import atomic_write, atomic_write_json, safetensors_bytes

WEIGHTS_FILE = "coder.safetensors"
CONFIG_FILE = "coder.json"
OPTIMIZER_FILE = "optimizer.safetensors"
FORMAT = "fmxcoders-coder/1"


FAULT_ENV = "FMX_FAULT_AT"  # fault injection for tests: "<point>@<directory name>"
FAULT_SIGNAL_ENV = "FMX_FAULT_SIGNAL"  # the signal sent there (default SIGKILL)


def fault_point(point: str, directory: Path) -> None:
    """Deterministic kill points for the fault suite (``tests/test_faults*.py``).

    With ``FMX_FAULT_AT=<point>@<directory name>`` the process sends itself
    ``FMX_FAULT_SIGNAL`` (default SIGKILL) when it reaches that point while writing that
    directory, so a test kills a run exactly there instead of polling the disk for a race
    it may lose. Points: ``weights`` (a checkpoint's weights written, nothing else),
    ``config`` (weights + coder.json, not sealed), ``sealed`` (checksums.json written)
    and ``started`` (``final/`` created, empty). Unset, this is one dict lookup."""
    wanted = os.environ.get(FAULT_ENV)
    if wanted and wanted == f"{point}@{Path(directory).name}":
        os.kill(os.getpid(), getattr(signal, os.environ.get(FAULT_SIGNAL_ENV, "SIGKILL")))


class CheckpointError(ValueError):
    """A checkpoint that is incomplete or damaged; the one-line message names the file."""


def warn(message: str) -> None:
    """A one-line warning on stderr (recoveries the user should know about)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _write_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    Path(path).write_bytes(safetensors_bytes(tensors, metadata))


def seal_checkpoint(path_dir: Path) -> None:
    """Write ``checksums.json`` (size + SHA-256 of every other file): the checkpoint is
    complete only once this file exists and matches."""
    path_dir = Path(path_dir)
    files = {
        p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(path_dir.iterdir())
        if p.is_file() and p.name != CHECKSUMS_FILE and not p.name.startswith(".")
    }
    atomic_write_json(path_dir / CHECKSUMS_FILE, {"format": CHECKSUMS_FORMAT, "files": files})
    fault_point("sealed", path_dir)


def verify_checkpoint(path_dir: Path, allow_legacy: bool = False) -> None:
    """Raise ``CheckpointError`` (naming the file) unless every file matches ``checksums.json``.

    ``allow_legacy``: a coder saved before ``checksums.json`` existed is accepted when its
    weights match the SHA-256 in its ``coder.json`` (for loading; training never resumes
    from, or skips for, a checkpoint it cannot fully verify)."""
    path_dir = Path(path_dir)
    listing = path_dir / CHECKSUMS_FILE
    legacy = (path_dir / CONFIG_FILE).is_file() and (path_dir / WEIGHTS_FILE).is_file()
    legacy = legacy and not (path_dir / OPTIMIZER_FILE).exists()
    if allow_legacy and legacy and not listing.is_file():
        _verify_legacy(path_dir)
        return
    problem = sealed_dir_problem(path_dir, (CONFIG_FILE, WEIGHTS_FILE))
    if problem is not None:
        raise CheckpointError(problem)


def _verify_legacy(path_dir: Path) -> None:
    doc = read_coder_json(path_dir)
    weights = path_dir / WEIGHTS_FILE
    if sha256_file(weights) != doc.get("weights_sha256"):
        raise CheckpointError(
            f"{weights} does not match {path_dir / CONFIG_FILE} (hash mismatch): the checkpoint "
            "was interrupted between its two files; re-save it or use an older checkpoint"
        )


def _cpu_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def save_coder(
    path_dir: Path,
    coder: SparseCoder,
    extra_json: dict[str, Any] | None = None,
    seal: bool = True,
) -> Path:
    """Write ``coder`` (weights, buffers, resolved config) into ``path_dir``; returns it.

    ``seal=False`` leaves the checksums to the caller, who adds more files first."""
    path_dir = Path(path_dir)
    path_dir.mkdir(parents=True, exist_ok=True)
    weights = path_dir / WEIGHTS_FILE
    tensors = _cpu_tensors(coder.state_dict())
    meta = {"format": FORMAT, "kind": coder.config.kind}
    atomic_write(weights, lambda tmp: _write_safetensors(tensors, tmp, meta))
    fault_point("weights", path_dir)
    doc = {
        "format": FORMAT,
        "config": coder.config.model_dump(mode="json"),
        "weights_sha256": sha256_file(weights),
        "extra": extra_json or {},
    }
    atomic_write_json(path_dir / CONFIG_FILE, doc)
    fault_point("config", path_dir)
    if seal:
        seal_checkpoint(path_dir)
    return path_dir


def read_coder_json(path_dir: Path) -> dict[str, Any]:
    """The checkpoint's JSON document (``config``, ``extra``, ``weights_sha256``)."""
    path = Path(path_dir) / CONFIG_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a coder checkpoint)") from None
    except ValueError as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{path_dir}: not a coder checkpoint (format in {path.name})")
    return doc


def load_coder(
    path_dir: Path, device: str | torch.device = "cpu", verify: bool = True
) -> SparseCoder:
    """Rebuild a coder from ``save_coder``'s output, on ``device``, in eval mode."""
    path_dir = Path(path_dir)
    if verify:
        verify_checkpoint(path_dir, allow_legacy=True)
    doc = read_coder_json(path_dir)
    weights = path_dir / WEIGHTS_FILE
    coder = build_coder(coder_config_from_dict(doc["config"]))
    try:
        state = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{weights}: unreadable ({err})") from None
    coder.load_state_dict(state, strict=True)
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
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("meta", "{}"))
        return load_file(str(path)), meta
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: unreadable ({err})") from None


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
