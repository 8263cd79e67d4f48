"""Distributed harvest: one coordinator, shards of blocks on dask.distributed workers.

The coordinator (the ``pipeline harvest --scheduler`` process, inside the store's file lock)
builds the token windows, writes the tables and manifest.json, and creates every array at
its final shape; workers then only write chunks and block markers. A shard is a contiguous
range of blocks and the unit of retry: a task skips blocks that already have a marker, so
a retried or resumed shard redoes only unmarked blocks. Blocks own distinct chunk files
(one chunk of ``chunk_tokens`` rows per block per hook, no sharding codec), so concurrent
writers never share a file; a stale attempt of the same shard (a worker presumed dead that
was not) writes identical bytes to the same files. The coordinator finalises exactly as
the single-process path does (stages/harvest.py), and the store is bit-identical to a
single-process harvest: ``harvest_blocks`` is shared and batches each block's windows the
same way.

Workers need the store on a shared filesystem (same path everywhere). fsspec URLs
(``s3://``) would need StorePaths and the marker/parquet writers to go through fsspec:
future work.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.harvest.blocks import create_store, harvest_blocks
from pipeline.harvest.cache_key import hash_material
from pipeline.harvest.models import ActivationModel, load_model
from pipeline.harvest.text_sources import load_documents
from pipeline.harvest.windows import TokenWindows, build_windows
from pipeline.manifests.harvest import HarvestManifest
from pipeline.paths import StorePaths
from pipeline.store.writer import StoreWriter

if TYPE_CHECKING:  # dask is imported only when a distributed harvest runs
    from distributed import Client, Future

SHARDS_PER_WORKER = 4  # enough tasks to balance uneven workers, few enough to stay cheap
TASK_RETRIES = 3  # retries after an exception; a dead worker is retried by the scheduler


class ClusterError(ValueError):
    """The cluster cannot run the harvest (unreachable scheduler, workers keep dying).

    A ValueError so that the CLI reports it as one line; the partial store is kept."""


# One model per worker process and (model spec, device): loaded by the first task, reused by
# every later shard on that worker.
_MODELS: dict[str, ActivationModel] = {}


def _worker_model(manifest: HarvestManifest) -> ActivationModel:
    key = manifest.model.model_dump_json() + "|" + manifest.run.device
    if key not in _MODELS:
        _MODELS[key] = load_model(manifest.model, manifest.run.device)
    return _MODELS[key]


@dataclass(frozen=True)
class ModelInfo:
    """What the coordinator needs from the model, without loading its weights itself."""

    tokenizer: object
    d_model: int
    n_layers: int
    hook_names: list[str]


def describe_model(manifest_json: str) -> ModelInfo:
    """Worker task: load (and cache) the model; return its tokenizer and shape."""
    manifest = HarvestManifest.model_validate_json(manifest_json)
    model = _worker_model(manifest)
    hook_names = model.hook_names(manifest.hooks)
    return ModelInfo(model.tokenizer, model.d_model, model.n_layers, hook_names)


def _stored_windows(paths: StorePaths, context_length: int) -> TokenWindows:
    """The coordinator's windows, read back from tokens.parquet on the shared filesystem."""
    tokens = pq.read_table(paths.tokens, columns=["token_id", "is_special"])
    token_ids = tokens["token_id"].to_numpy().copy()  # writable: torch.from_numpy warns
    token_ids = token_ids.reshape(-1, context_length)
    return TokenWindows(token_ids, tokens, pa.table({}))


def harvest_shard(manifest_json: str, store_root: str, blocks: list[int]) -> list[int]:
    """Worker task: harvest the shard's blocks that have no marker yet; returns ``blocks``."""
    manifest = HarvestManifest.model_validate_json(manifest_json)
    model = _worker_model(manifest)
    paths = StorePaths(Path(store_root))
    hook_names = model.hook_names(manifest.hooks)
    windows = _stored_windows(paths, manifest.tokenization.context_length)
    writer = StoreWriter(paths, hook_names, windows.n_tokens, model.d_model, manifest.storage)
    try:
        harvest_blocks(model, windows, writer, hook_names, manifest, blocks)
    finally:
        writer.close()
    return blocks


def plan_shards(missing: list[int], shard_blocks: int) -> list[list[int]]:
    """Contiguous runs of missing blocks, cut into shards of at most ``shard_blocks``."""
    shards: list[list[int]] = []
    for block in sorted(missing):
        last = shards[-1] if shards else None
        if last is not None and last[-1] == block - 1 and len(last) < shard_blocks:
            last.append(block)
        else:
            shards.append([block])
    return shards


@contextmanager
def connect(scheduler: str) -> Iterator[Client]:
    """A dask Client: ``local:N`` starts N single-threaded worker processes on this machine."""
    from distributed import Client, LocalCluster

    if scheduler.startswith("local:"):
        count = scheduler.removeprefix("local:")
        if not count.isdigit() or int(count) < 1:
            raise ClusterError(f"--scheduler {scheduler}: expected local:N with N >= 1")
        with (
            LocalCluster(
                n_workers=int(count),
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",  # any free port: 8787 may be taken
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client
        return
    try:
        client = Client(scheduler, timeout="30s")
    except (OSError, TimeoutError) as err:
        raise ClusterError(
            f"--scheduler {scheduler}: cannot reach the dask scheduler ({err}); start one "
            f"with `dask scheduler` or use --scheduler local:N"
        ) from None
    with client:
        yield client


def _run_shards(client: Client, futures: list[Future], total: int, progress: bool) -> None:
    """Wait for every shard; the first failure cancels the rest (the store stays resumable)."""
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    bar = tqdm(total=total, unit="block", desc="harvest shards", disable=not progress)
    try:
        for future in as_completed(futures):
            try:
                bar.update(len(future.result()))
            except KilledWorker as err:
                raise ClusterError(
                    f"harvest task {future.key} killed its worker repeatedly ({err}); the "
                    f"partial store is kept: fix the workers (memory?) and rerun to resume"
                ) from None
    except BaseException:
        client.cancel(futures)
        raise
    finally:
        bar.close()


def harvest_on_cluster(
    manifest: HarvestManifest,
    paths: StorePaths,
    material: dict,
    manifest_source: str,
    scheduler: str,
    shard_blocks: int | None = None,
) -> tuple[StoreWriter, float]:
    """Coordinator side, called by ``stages.harvest.run`` inside the file lock.

    ``material`` is the manifest's cache-key material. Returns the coordinator's writer
    (for ``finalize``) and the tokens/s of this run."""
    if shard_blocks is not None and shard_blocks < 1:
        raise ValueError(f"--shard-blocks: must be >= 1, not {shard_blocks}")
    quiet = manifest.model_copy(update={"run": manifest.run.model_copy(update={"progress": False})})
    manifest_json = quiet.model_dump_json()
    with connect(scheduler) as client:
        info = client.submit(describe_model, manifest_json, pure=False).result()
        windows = build_windows(
            load_documents(manifest.text), info.tokenizer, manifest.tokenization
        )
        shape = (info.d_model, info.n_layers)
        writer = create_store(
            paths, manifest, material, manifest_source, windows, shape, info.hook_names
        )
        missing = writer.missing_blocks()
        workers = max(1, len(client.nthreads()))  # those connected now; more may join
        per_shard = shard_blocks or max(1, math.ceil(len(missing) / (SHARDS_PER_WORKER * workers)))
        shards = plan_shards(missing, per_shard)
        token = uuid.uuid4().hex[:8]
        started = time.perf_counter()
        futures = [
            client.submit(
                harvest_shard,
                manifest_json,
                str(paths.root),
                shard,
                key=f"harvest-{hash_material(material)[:8]}-blocks-{shard[0]}-{shard[-1]}-{token}",
                retries=TASK_RETRIES,
            )
            for shard in shards
        ]
        _run_shards(client, futures, len(missing), manifest.run.progress)
        elapsed = time.perf_counter() - started
    unmarked = writer.missing_blocks()
    if unmarked:
        raise ClusterError(f"{paths.root}: blocks {unmarked} have no marker after every shard ran")
    tokens = sum(stop - start for start, stop in map(writer.block_rows, missing))
    return writer, tokens / elapsed if elapsed > 0 else float("nan")
