"""Finding stores under a cache root, for ``pipeline ls`` / ``show`` and for training."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.paths import StorePaths, default_cache_root, incomplete_store_dir, store_dir
from pipeline.store import ActivationStore, StoreError
from pipeline.store_format import tree_bytes


@dataclass(frozen=True)
class StoreSummary:
    key: str
    status: str  # complete | incomplete
    tokens: int
    layers: int
    size_mb: float
    model: str


def _describe_model(manifest: dict) -> str:
    model = manifest.get("manifest", {}).get("model", {})
    if model.get("source") == "random":
        return f"random {model['n_layers']}x{model['d_model']} (seed {model['seed']})"
    return model.get("path") or model.get("name") or "?"


def _summary(root: Path, key: str, status: str) -> StoreSummary:
    paths = StorePaths(root)
    manifest = json.loads(paths.manifest.read_text()) if paths.manifest.is_file() else {}
    tokens = manifest.get("manifest", {}).get("tokenization", {}).get("num_tokens", 0)
    layers = 0
    if paths.completion.is_file():
        layers = len(json.loads(paths.completion.read_text())["hooks"])
    elif paths.activations.is_dir():
        layers = sum(1 for p in paths.activations.iterdir() if p.is_dir())
    size = tree_bytes(root)
    return StoreSummary(key, status, tokens, layers, size / 1e6, _describe_model(manifest))


def list_stores(cache_root: Path | None = None) -> list[StoreSummary]:
    root = Path(cache_root) if cache_root else default_cache_root()
    if not root.is_dir():
        return []
    rows = []
    for entry in sorted(root.iterdir()):
        if not entry.is_dir():
            continue
        if entry.name.endswith(".incomplete"):
            rows.append(_summary(entry, entry.name.removesuffix(".incomplete"), "incomplete"))
        else:
            rows.append(_summary(entry, entry.name, "complete"))
    return rows


def find_store(key: str, cache_root: Path | None = None, verify: bool = False) -> ActivationStore:
    """Open a finished store by key (a unique prefix is enough)."""
    root = Path(cache_root) if cache_root else default_cache_root()
    candidates = [p for p in root.glob(f"{key}*") if p.is_dir()] if root.is_dir() else []
    finished = [p for p in candidates if not p.name.endswith(".incomplete")]
    if len(finished) > 1:
        raise StoreError(f"cache key prefix '{key}' is ambiguous under {root}")
    if not finished:
        if incomplete_store_dir(root, key).is_dir() or any(
            p.name.endswith(".incomplete") for p in candidates
        ):
            raise StoreError(
                f"cache {key} under {root} is incomplete: run `pipeline harvest` on its "
                "manifest again to finish it"
            )
        raise StoreError(f"no cache {key} under {root} (see `pipeline ls`)")
    return ActivationStore(store_dir(root, finished[0].name), verify=verify)
