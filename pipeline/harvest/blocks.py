"""Harvesting blocks into a store: what the single-process harvest (stages/harvest.py) and
the distributed shards (stages/distributed_harvest.py) share, so both stages call it and
neither imports the other's internals.
"""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from pipeline.harvest.cache_key import hash_material
from pipeline.harvest.models import ActivationModel
from pipeline.harvest.windows import TokenWindows
from pipeline.manifests.harvest import HarvestManifest
from pipeline.paths import StorePaths
from pipeline.store.format import TORCH_STORAGE, atomic_write_json, atomic_write_parquet
from pipeline.store.writer import StoreWriter, check_store_space


def _write_tables(paths: StorePaths, windows: TokenWindows) -> None:
    """Write the token/document tables once; on resume, check they still agree."""
    if paths.tokens.is_file():
        stored = pq.read_table(paths.tokens, columns=["token_id"])["token_id"].to_numpy()
        if not np.array_equal(stored, windows.token_ids.reshape(-1)):
            raise RuntimeError(
                f"{paths.tokens}: the partial store was tokenised differently; delete "
                f"{paths.root} and harvest again"
            )
        return
    atomic_write_parquet(paths.documents, windows.documents)
    atomic_write_parquet(paths.tokens, windows.tokens)


class _BlockWriterThread:
    """Writes finished blocks in the background; re-raises its error in the caller."""

    def __init__(self, writer: StoreWriter) -> None:
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="block-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.writer.write_block(*item)
                except BaseException as err:  # surfaced by put()/close()
                    self.error = err

    def put(self, block: int, stored: torch.Tensor, keep: torch.Tensor) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((block, stored, keep))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def harvest_blocks(
    model: ActivationModel,
    windows: TokenWindows,
    writer: StoreWriter,
    hook_names: list[str],
    manifest: HarvestManifest,
    blocks: list[int] | None = None,
) -> float:
    """Run every missing block (of ``blocks``, default all); returns tokens/s of this run.

    Shared by the single-process path and the distributed shards (stages/distributed_harvest.py),
    so both batch the windows of a block identically and store the same bits.
    """
    ctx = manifest.tokenization.context_length
    batch_size = manifest.run.batch_size
    dtype = TORCH_STORAGE[manifest.storage.dtype]
    device = model.device
    pin = device.type == "cuda"
    special = windows.tokens["is_special"].to_numpy(zero_copy_only=False)
    missing = writer.missing_blocks()
    if blocks is not None:  # a distributed shard: its own blocks only
        wanted = set(blocks)
        missing = [b for b in missing if b in wanted]
    total = sum(stop - start for start, stop in map(writer.block_rows, missing))
    bar = tqdm(
        total=total, unit="tok", unit_scale=True, desc="harvest", disable=not manifest.run.progress
    )
    background = _BlockWriterThread(writer)
    started = time.perf_counter()
    try:
        for block in missing:
            start, stop = writer.block_rows(block)
            rows = stop - start
            stored = torch.empty(
                (rows, len(hook_names), model.d_model), dtype=dtype, pin_memory=pin
            )
            first_window = start // ctx
            for w in range(first_window, stop // ctx, batch_size):
                w_stop = min(w + batch_size, stop // ctx)
                tokens = torch.from_numpy(windows.token_ids[w:w_stop])
                out = torch.empty(
                    (w_stop - w, ctx, len(hook_names), model.d_model), dtype=dtype, device=device
                )
                model.capture(tokens, hook_names, out)
                lo = (w - first_window) * ctx
                stored[lo : lo + out.shape[0] * ctx].copy_(out.flatten(0, 1), non_blocking=pin)
                bar.update(out.shape[0] * ctx)
            if pin:
                torch.cuda.synchronize(device)
            keep = torch.from_numpy(~special[start:stop])
            background.put(block, stored, keep)
        background.close()
    finally:
        bar.close()
    elapsed = time.perf_counter() - started
    return total / elapsed if elapsed > 0 else float("nan")


def create_store(
    paths: StorePaths,
    manifest: HarvestManifest,
    material: dict,
    manifest_source: str,
    windows: TokenWindows,
    model_shape: tuple[int, int],
    hook_names: list[str],
) -> StoreWriter:
    """Tables, manifest.json and every array at final shape: all a harvest writes up front.

    ``material`` is the manifest's cache-key material (computed once by the caller: it
    hashes the model file); ``model_shape`` is ``(d_model, n_layers)``. The distributed
    coordinator calls this too, before any worker writes a block. Nothing is created
    before the model and the text loaded, so a bad manifest leaves no empty partial store
    behind, and nothing before the disk is known to hold the store (less what a killed
    harvest already wrote): refused with the figure otherwise.
    """
    d_model, n_layers = model_shape
    size = manifest.tokenization.num_tokens, len(hook_names), d_model, manifest.storage.dtype
    check_store_space(paths.root, *size, "this harvest")
    paths.root.mkdir(parents=True, exist_ok=True)
    _write_tables(paths, windows)
    atomic_write_json(
        paths.manifest,
        {
            "key": hash_material(material),
            "source": manifest_source,
            "manifest": manifest.model_dump(mode="json"),
            "key_material": material,
            "d_model": d_model,
            "model_n_layers": n_layers,
        },
    )
    return StoreWriter(paths, hook_names, windows.n_tokens, d_model, manifest.storage)
