"""What a trained coder needs beside its weights to be used without the activation cache.

A run's ``final/`` holds ``normalisation.safetensors``: the per-layer ``mean`` ``[L, d]`` and
``scale`` ``[L]`` the coder was trained on (as tensors: JSON floats would round them), with
the hook names, model identity, stored dtype, cache key and run name in its header. With it,
``x_norm = (x - centre * mean) * scale`` is known exactly, so the coder can be applied to raw
activations (``pipeline.api.load_coder``) or exported with normalisation folded in
(``pipeline.training.export``). Runs trained before this file existed are read from their cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.store.format import atomic_write_bytes, safetensors_bytes

NORMALISATION_FILE = "normalisation.safetensors"
FORMAT = "fmxcoders-normalisation/1"


@dataclass(frozen=True)
class RunRecord:
    """The normalisation and provenance of one trained coder."""

    mean: torch.Tensor  # [L, d] float32, per selected layer
    scale: torch.Tensor  # [L] float32
    centre: bool
    hook_names: list[str]  # one per coder layer
    layers: list[int]  # indices into the store's hooks
    model: dict[str, Any]  # the harvest manifest's model section (name, source, identity)
    storage_dtype: str  # dtype the activations were stored in
    cache_key: str
    name: str

    @classmethod
    def from_store(
        cls, store: Any, layers: list[int], centre: bool, name: str, outliers: Any = None
    ) -> RunRecord:
        """The record of a coder trained on ``layers`` of ``store`` (an ActivationStore),
        normalised over the tokens ``outliers`` (an OutlierScan, or None) keeps."""
        from pipeline.training.loader import Normaliser

        norm = Normaliser.from_store(store, layers, centre, outliers)
        material = store.manifest.get("key_material", {})
        return cls(
            norm.mean.float().cpu(),
            norm.scale.float().cpu(),
            centre,
            [store.hook_names[layer] for layer in layers],
            list(layers),
            material.get("model", store.manifest.get("manifest", {}).get("model", {})),
            store.dtype,
            store.key,
            name,
        )

    def metadata(self) -> dict[str, Any]:
        """Everything but the tensors, JSON-able (also copied into ``coder.json``'s extra)."""
        return {
            "centre": self.centre,
            "hook_names": self.hook_names,
            "layers": self.layers,
            "model": self.model,
            "storage_dtype": self.storage_dtype,
            "cache_key": self.cache_key,
            "name": self.name,
        }

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Raw ``[..., L, d]`` activations -> the units the coder was trained on."""
        mean, scale = self.mean.to(x.device), self.scale.to(x.device)
        x = x.float()
        if self.centre:
            x = x - mean
        return x * scale[:, None]

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of ``normalise``: coder units -> raw activations."""
        mean, scale = self.mean.to(x.device), self.scale.to(x.device)
        x = x / scale[:, None]
        return x + mean if self.centre else x

    def write(self, directory: Path) -> Path:
        path = Path(directory) / NORMALISATION_FILE
        tensors = {"mean": self.mean.contiguous(), "scale": self.scale.contiguous()}
        header = {"format": FORMAT, "meta": json.dumps(self.metadata(), sort_keys=True)}
        atomic_write_bytes(path, safetensors_bytes(tensors, header))  # same record, same bytes
        return path


def read_record(checkpoint: Path) -> RunRecord | None:
    """The record saved beside a checkpoint, or None when it predates the file."""
    path = Path(checkpoint) / NORMALISATION_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as fh:
        header = fh.metadata() or {}
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: not a normalisation file (format {header.get('format')!r})")
    meta = json.loads(header["meta"])
    tensors = load_file(str(path))
    if tensors["mean"].shape[0] != len(meta["hook_names"]):
        raise ValueError(f"{path}: mean has {tensors['mean'].shape[0]} layers, hook_names differ")
    return RunRecord(
        tensors["mean"],
        tensors["scale"],
        bool(meta["centre"]),
        list(meta["hook_names"]),
        list(meta["layers"]),
        dict(meta["model"]),
        str(meta["storage_dtype"]),
        str(meta["cache_key"]),
        str(meta["name"]),
    )


def load_record(checkpoint: Path, cache_root: Path | None = None) -> RunRecord:
    """``read_record``, else rebuilt from the run's cache (older runs; needs the cache)."""
    checkpoint = Path(checkpoint)
    record = read_record(checkpoint)
    if record is not None:
        return record
    from pipeline.store.catalog import find_store
    from pipeline.store.outliers import outlier_scan
    from pipeline.training.checkpoint import read_coder_json
    from pipeline.training.manifest import recorded_manifest

    run_json = checkpoint.parent / "coder_manifest.json"
    doc = json.loads(run_json.read_text()) if run_json.is_file() else {}
    doc = doc or read_coder_json(checkpoint).get("extra", {})
    if "manifest" not in doc or "cache_key" not in doc:
        raise ValueError(
            f"{checkpoint}: no {NORMALISATION_FILE} and no run record naming its cache"
        )
    manifest = recorded_manifest(doc["manifest"])
    root = cache_root or (Path(manifest.cache.root) if manifest.cache.root else None)
    store = find_store(doc["cache_key"], root)
    layers = list(range(store.n_layers)) if manifest.layers == "all" else list(manifest.layers)
    outliers = outlier_scan(store, manifest.training.outlier_norm_ratio)
    return RunRecord.from_store(store, layers, manifest.training.centre, manifest.name, outliers)
