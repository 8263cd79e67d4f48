"""Convert stage: a finished store -> a smaller 8-bit store of the same tokens, no model.

The new store's key is the source's key material with ``storage_dtype`` replaced, so it is
the key (and, block for block, the bytes) that harvesting the same manifest with that
dtype would give: 8-bit stores are quantised from bf16 in both paths. Tables are copied
byte for byte; blocks are written like a harvest's (markers, resume after a kill, one lock
per key), then finished and renamed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from pipeline.harvest.cache_key import hash_material
from pipeline.manifests.harvest import StorageSpec
from pipeline.paths import StorePaths, incomplete_store_dir, store_dir, store_lock
from pipeline.store.catalog import find_store
from pipeline.store.format import (
    QUANTISED,
    TORCH_STORAGE,
    atomic_write_json,
    from_storage_numpy,
    fsync_dir,
    is_quantised,
)
from pipeline.store.locks import exclusive_lock
from pipeline.store.reader import ActivationStore
from pipeline.store.writer import (
    StoreWriter,
    check_store_space,
    disk_full_as_one_line,
    seal_store,
)
from stages.harvest import HarvestResult


def target_manifest(source: ActivationStore, dtype: str) -> tuple[dict, str]:
    """The converted store's manifest.json and key; refuses what it cannot derive."""
    if dtype not in QUANTISED:
        raise ValueError(f"--dtype must be one of {', '.join(QUANTISED)}, not {dtype!r}")
    if is_quantised(source.dtype):
        raise ValueError(
            f"{source.paths.root}: already {source.dtype}; convert from a bf16/fp16/fp32 store "
            "(8-bit from 8-bit would add the rounding twice)"
        )
    stored = source.manifest
    if "key_material" not in stored or "manifest" not in stored:
        raise source.damaged(source.paths.manifest, "no key_material/manifest fields")
    if stored["manifest"]["storage"].get("codec") == "zstd-gpu":
        raise ValueError(f"{source.paths.manifest}: a zstd-gpu store; 8-bit needs codec zstd")
    material = {**stored["key_material"], "storage_dtype": dtype}
    key = hash_material(material)
    manifest = json.loads(json.dumps(stored["manifest"]))
    manifest["storage"]["dtype"] = dtype
    record = {
        **stored,
        "key": key,
        "key_material": material,
        "manifest": manifest,
        "converted_from": source.key,
    }
    return record, key


def convert_blocks(source: ActivationStore, writer: StoreWriter, keep: torch.Tensor) -> float:
    """Every block without a marker, read from ``source`` and written; tokens per second.
    The next block is read (decompressed) in a thread while this one is quantised and
    written: two blocks in memory, the two halves' work overlapped."""
    missing = writer.missing_blocks()
    started = time.perf_counter()
    cast = TORCH_STORAGE[writer.storage.dtype]

    def read(block: int) -> torch.Tensor:
        start, stop = writer.block_rows(block)
        return from_storage_numpy(source.read_stored(start, stop), source.dtype).to(cast)

    rows = 0
    with ThreadPoolExecutor(max_workers=1) as reader:
        ahead = [reader.submit(read, block) for block in missing[:1]]
        for i, block in enumerate(missing):
            stored = ahead.pop().result()
            ahead += [reader.submit(read, b) for b in missing[i + 1 : i + 2]]
            start, stop = writer.block_rows(block)
            writer.write_block(block, stored, keep[start:stop])
            rows += stop - start
    return rows / max(time.perf_counter() - started, 1e-9)


def run(source_key: str, dtype: str, cache_root: Path | None = None) -> HarvestResult:
    """Derive the ``dtype`` store of ``source_key`` (a unique prefix is enough) beside it
    under ``cache_root`` (default: the data dir's), or find it already derived."""
    source = find_store(source_key, cache_root)
    cache_root = source.paths.root.parent
    record, key = target_manifest(source, dtype)
    final = store_dir(cache_root, key)
    if StorePaths(final).completion.is_file():
        return HarvestResult(key, final, cache_hit=True)
    with exclusive_lock(store_lock(cache_root, key)):
        if StorePaths(final).completion.is_file():
            return HarvestResult(key, final, cache_hit=True)
        started = time.perf_counter()
        paths = StorePaths(incomplete_store_dir(cache_root, key))
        shape = source.n_tokens, source.n_layers, source.d_model
        check_store_space(paths.root, *shape, dtype, "this convert")
        paths.root.mkdir(parents=True, exist_ok=True)
        for table in (source.paths.tokens, source.paths.documents):
            shutil.copyfile(table, paths.root / table.name)
        atomic_write_json(paths.manifest, record)
        spec = StorageSpec.model_validate(record["manifest"]["storage"])
        writer = StoreWriter(paths, source.hook_names, source.n_tokens, source.d_model, spec)
        special = source.tokens(columns=["is_special"])["is_special"]
        keep = ~torch.from_numpy(special.to_numpy(zero_copy_only=False).copy())
        try:
            with disk_full_as_one_line(paths.root, f"the {dtype} store of cache {key}"):
                rate = convert_blocks(source, writer, keep)
        except BaseException:
            writer.close()
            raise
        seal_store(writer, paths, time.perf_counter() - started)
        os.replace(paths.root, final)
        fsync_dir(cache_root)
    return HarvestResult(key, final, cache_hit=False, tokens_per_second=rate)
