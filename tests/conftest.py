"""Shared fixtures: a tiny-random manifest factory and one harvested tiny store per session.

Assets (model weights, text packages) live under ``$FMX_DATA_DIR`` (default
``~/.cache/fmxcoders``), so they are downloaded once and shared across test runs; every
store a test writes goes under pytest's ``tmp_path``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from pipeline.manifests.harvest import HarvestManifest
from stages import harvest

REPO = Path(__file__).resolve().parents[1]
TINY_MANIFEST_FILE = REPO / "manifests" / "harvest" / "tiny-random.yaml"


def merge(base: dict, overrides: dict) -> dict:
    """Deep-merge ``overrides`` into a copy of ``base`` (nested dicts merge, others replace)."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def dotted(overrides: dict) -> dict:
    """``{"tokenization.seed": 1}`` -> ``{"tokenization": {"seed": 1}}``."""
    nested: dict = {}
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        target = nested
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    return nested


def tiny_manifest_dict() -> dict:
    """The fast tests' manifest, read from the example the README and CLI use."""
    return yaml.safe_load(TINY_MANIFEST_FILE.read_text())


@pytest.fixture
def tiny_manifest() -> Callable[..., HarvestManifest]:
    """Factory: ``tiny_manifest(tokenization={"seed": 1})`` or ``tiny_manifest(**{"a.b": v})``.

    Section keyword arguments deep-merge into the tiny-random manifest; dotted names set
    one field. Returns a validated ``HarvestManifest``.
    """

    def make(**overrides) -> HarvestManifest:
        sections = {k: v for k, v in overrides.items() if "." not in k}
        fields = dotted({k: v for k, v in overrides.items() if "." in k})
        data = merge(merge(tiny_manifest_dict(), sections), fields)
        return HarvestManifest.model_validate(data)

    return make


@pytest.fixture(scope="session")
def tiny_cache_root(tmp_path_factory) -> Path:
    """A cache root holding one finished tiny-random store (harvested once per session)."""
    root = tmp_path_factory.mktemp("tiny-cache")
    harvest.run(HarvestManifest.model_validate(tiny_manifest_dict()), root)
    return root


@pytest.fixture(scope="session")
def tiny_store(tiny_cache_root) -> Path:
    """The path of the session's finished tiny-random store; treat it as read-only."""
    (store,) = [p for p in tiny_cache_root.iterdir() if p.is_dir()]
    return store
