"""Harvest stage: manifest -> model forward over token windows -> a finished Zarr store.

The model runs in the main thread; a writer thread compresses and writes each finished
block while the next is computed, so storage overlaps the forward. A second run with
the same manifest is a cache hit; a killed run resumes from its block markers. With a
dask scheduler, shards of blocks run on workers instead (stages/distributed_harvest.py).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.harvest.blocks import create_store, harvest_blocks
from pipeline.harvest.cache_key import hash_material, key_material
from pipeline.harvest.models import load_model
from pipeline.harvest.text_sources import load_documents
from pipeline.harvest.windows import build_windows
from pipeline.manifests.harvest import HarvestManifest
from pipeline.manifests.io import check_device, check_writable_dir
from pipeline.paths import (
    StorePaths,
    default_cache_root,
    incomplete_store_dir,
    store_dir,
    store_lock,
)
from pipeline.store.format import fsync_dir
from pipeline.store.locks import exclusive_lock
from pipeline.store.reader import ActivationStore
from pipeline.store.writer import (
    StoreWriter,
    disk_full_as_one_line,
    seal_store,
)

DAMAGED_SUFFIX = ".damaged"  # a finished store that lost complete.json, while it is replaced


@dataclass(frozen=True)
class HarvestResult:
    key: str
    path: Path
    cache_hit: bool
    tokens_per_second: float | None = None


def resolve_cache_root(manifest: HarvestManifest, cache_root: Path | None = None) -> Path:
    if cache_root is not None:
        return Path(cache_root)
    if manifest.run.cache_root:
        return Path(manifest.run.cache_root)
    return default_cache_root()


def _replace_damaged(final: Path) -> None:
    """A finished directory without ``complete.json`` is damaged (its record deleted): say
    so and move it out of the way, so the new harvest can take its place. It is removed
    only after the new store is complete."""
    if final.is_dir() and not StorePaths(final).completion.is_file():
        print(
            f"warning: {final} has no complete.json (damaged); harvesting it again "
            "and replacing it",
            file=sys.stderr,
            flush=True,
        )
        os.replace(final, final.with_name(final.name + DAMAGED_SUFFIX))


def _harvest_here(
    manifest: HarvestManifest, paths: StorePaths, material: dict, manifest_source: str
) -> tuple[StoreWriter, float]:
    """The single-process path: the model runs in this process."""
    if manifest.model.source == "planted":  # synthetic truth: no model, no text
        from pipeline.harvest import planted

        windows = planted.planted_windows(manifest.model.planted_spec, manifest.tokenization)
        spec = manifest.model.planted_spec
        names = planted.hook_names(manifest)
        shape = (spec.d_model, spec.n_layers)
        writer = create_store(paths, manifest, material, manifest_source, windows, shape, names)
        return writer, planted.write_planted_blocks(manifest, windows, writer)
    model = load_model(manifest.model, manifest.run.device)
    windows = build_windows(load_documents(manifest.text), model.tokenizer, manifest.tokenization)
    hook_names = model.hook_names(manifest.hooks)
    shape = (model.d_model, model.n_layers)
    writer = create_store(paths, manifest, material, manifest_source, windows, shape, hook_names)
    return writer, harvest_blocks(model, windows, writer, hook_names, manifest)


def run(
    manifest: HarvestManifest,
    cache_root: Path | None = None,
    manifest_source: str = "",
    scheduler: str | None = None,
    shard_blocks: int | None = None,
) -> HarvestResult:
    """Harvest the manifest's activations, or return the finished store if it exists.

    ``scheduler`` (a dask address, or ``local:N``) spreads the blocks over dask workers;
    ``shard_blocks`` is the number of blocks per task there (default: automatic).
    """
    source = manifest_source or "harvest manifest"
    root = resolve_cache_root(manifest, cache_root)
    if scheduler is None:  # dask workers may have devices this coordinator lacks
        check_device(manifest.run.device, f"{source}: field 'run.device'")
    where = "--cache-root" if cache_root is not None else f"{source}: field 'run.cache_root'"
    check_writable_dir(root, where)
    material = key_material(manifest)  # hashes the model and text files: once per harvest
    key = hash_material(material)
    final = store_dir(root, key)
    if StorePaths(final).completion.is_file():
        ActivationStore(final)  # sizes + table checksums; `pipeline show --verify` does all
        return HarvestResult(key, final, cache_hit=True)
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(store_lock(root, key)):  # waits; the lock file goes on exit
        if StorePaths(final).completion.is_file():  # another process finished it meanwhile
            return HarvestResult(key, final, cache_hit=True)
        _replace_damaged(final)
        started = time.perf_counter()
        paths = StorePaths(incomplete_store_dir(root, key))
        if scheduler is not None and manifest.model.source == "planted":
            raise ValueError("model.source 'planted' is generated locally: drop --scheduler")
        with disk_full_as_one_line(paths.root, f"the store of cache {key}"):
            if scheduler is None:
                writer, rate = _harvest_here(manifest, paths, material, manifest_source)
            else:
                from stages.distributed_harvest import harvest_on_cluster  # dask when asked

                writer, rate = harvest_on_cluster(
                    manifest, paths, material, manifest_source, scheduler, shard_blocks
                )
            seal_store(writer, paths, time.perf_counter() - started)
        os.replace(paths.root, final)
        fsync_dir(root)
        shutil.rmtree(final.with_name(final.name + DAMAGED_SUFFIX), ignore_errors=True)
    return HarvestResult(key, final, cache_hit=False, tokens_per_second=rate)
