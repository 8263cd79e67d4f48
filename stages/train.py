"""Train stage: coder manifests + a finished cache -> checkpoints. Never harvests.

Runs that share a loader signature are stepped on the same batches, so N variants read
the store once. Each run resumes from its last checkpoint; a finished run is skipped.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline.cache_key import cache_key
from pipeline.catalog import find_store
from pipeline.ddp import init_from_env
from pipeline.harvest_manifest import load_harvest_manifest
from pipeline.loader import ActivationLoader
from pipeline.models import resolve_device
from pipeline.paths import RunPaths, default_runs_root, run_dir
from pipeline.store import ActivationStore, StoreError
from pipeline.store_format import atomic_write_json
from pipeline.train_manifest import CoderManifest, check_coder_section
from pipeline.trainer import CoderRun, new_coder_run


@dataclass(frozen=True)
class TrainResult:
    name: str
    run_dir: Path
    steps: int
    skipped: bool


def open_cache(manifest: CoderManifest, base: Path) -> ActivationStore:
    """The store a coder manifest names; a missing one tells the user what to harvest."""
    ref = manifest.cache
    root = Path(ref.root) if ref.root else None
    if ref.key:
        return find_store(ref.key, root)
    harvest_path = base / ref.harvest_manifest
    harvest = load_harvest_manifest(harvest_path)
    key = cache_key(harvest)
    if root is None and harvest.run.cache_root:
        root = Path(harvest.run.cache_root)
    try:
        return find_store(key, root)
    except StoreError as err:
        raise StoreError(
            f"{err}\nThe cache for {harvest_path} is not ready: "
            f"run `pipeline harvest {harvest_path}`"
        ) from None


def store_layers(manifest: CoderManifest, store: ActivationStore) -> list[int]:
    """The manifest's layers as indices into the store's hooks, checked against it."""
    if manifest.layers == "all":
        return list(range(store.n_layers))
    bad = [layer for layer in manifest.layers if layer >= store.n_layers]
    if bad:
        raise ValueError(f"layers: {bad} out of range: the cache has {store.n_layers} hooks")
    return list(manifest.layers)


def run_paths(manifest: CoderManifest, cache: str) -> RunPaths:
    """Where a coder manifest's run lives: runs root / cache key / hash of its weights' spec."""
    root = Path(manifest.run.runs_root) if manifest.run.runs_root else default_runs_root()
    return RunPaths(run_dir(root, cache, manifest.run_hash()))


def _log(run: CoderRun, terms: dict[str, float], tokens_per_second: float, writer) -> None:
    record = {"step": run.step, "tokens": run.step * run.manifest.training.batch_size}
    record.update({k: float(v) for k, v in terms.items()})
    record["tokens_per_second"] = tokens_per_second
    with run.paths.metrics.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    if writer is not None:
        for key, value in record.items():
            if key != "step":
                writer.add_scalar(key, value, run.step)


def _tensorboard(run: CoderRun):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional at run time
        return None
    return SummaryWriter(str(run.paths.tensorboard), purge_step=run.step or None)


def _train_group(runs: list[CoderRun], loader: ActivationLoader, progress: bool) -> None:
    """Step every unfinished run of the group on the same batch stream."""
    active = [r for r in runs if not r.done]
    if not active:
        return
    start = min(r.step for r in active)
    total = max(r.total_steps for r in active)
    per_epoch = loader.steps_per_epoch()
    main = all(r.is_main for r in active)  # torchrun: rank 0 alone logs
    writers = {id(r): _tensorboard(r) if main else None for r in active}
    names = ", ".join(r.manifest.name for r in active)
    bar = tqdm(
        total=total,
        initial=start,
        unit="step",
        desc=f"train {names}",
        disable=not (progress and main),
    )
    step = start
    for run in active:
        run.log_time, run.log_step = time.perf_counter(), run.step
    try:
        while step < total:
            epoch, skip = divmod(step, per_epoch)
            for batch in loader.epoch(epoch, skip_batches=skip):
                for run in active:
                    if run.step != step or run.done:
                        continue
                    terms = run.train_step(batch)
                    spec = run.manifest.training
                    if main and (run.step % spec.log_every == 0 or run.done):
                        now = time.perf_counter()
                        elapsed = max(now - run.log_time, 1e-9)
                        rate = (run.step - run.log_step) * spec.batch_size / elapsed
                        run.log_time, run.log_step = now, run.step
                        _log(run, terms, rate, writers[id(run)])
                    if run.step % spec.checkpoint_every == 0 and not run.done:
                        run.save_checkpoint()
                step += 1
                bar.update(1)
                if step >= total:
                    break
    finally:
        bar.close()
        for writer in writers.values():
            if writer is not None:
                writer.close()
    for run in active:
        run.save_final()


def run(manifests: list[tuple[CoderManifest, Path]]) -> list[TrainResult]:
    """Train every manifest (``(manifest, base dir for relative paths)``) from its cache.

    Under torchrun (WORLD_SIZE > 1) every rank trains its rows of each batch (pipeline/ddp.py).
    """
    dist = init_from_env()
    groups: dict[tuple, list[CoderRun]] = defaultdict(list)
    stores: dict[tuple, tuple[ActivationStore, list[int], CoderManifest]] = {}
    results = []
    opened: dict[tuple, ActivationStore] = {}  # variants of one cache: hash and open it once
    for manifest, base in manifests:
        ref = manifest.cache
        where = (ref.key or base / ref.harvest_manifest, ref.root)
        if where not in opened:
            opened[where] = open_cache(manifest, base)
        store = opened[where]
        layers = store_layers(manifest, store)
        config = check_coder_section(manifest, len(layers), store.d_model, manifest.name)
        paths = run_paths(manifest, store.key)
        if paths.final.is_dir():
            results.append(TrainResult(manifest.name, paths.root, manifest.total_steps(), True))
            continue
        device = resolve_device(manifest.run.device)
        if dist is not None:
            device = dist.device(device)
        spec = manifest.training
        signature = (store.key, tuple(layers), spec.batch_size, spec.seed, spec.centre, str(device))
        groups[signature].append(new_coder_run(manifest, config, paths, store.key, device, dist))
        stores[signature] = (store, layers, manifest)
    for signature, runs in groups.items():
        store, layers, manifest = stores[signature]
        spec = manifest.training
        loader = ActivationLoader(
            store,
            batch_size=spec.batch_size,
            layers=layers,
            split="train",
            seed=spec.seed,
            device=signature[-1],
            centre=spec.centre,
            mode=manifest.run.loader_mode,
            resident_max_bytes=manifest.run.resident_max_bytes,
            verbose=dist is None or dist.is_main,
        )
        for run in runs:
            if run.is_main:
                atomic_write_json(run.paths.loader, loader.describe())
        if dist is not None:
            dist.check_batches(loader.n_tokens, spec.batch_size)
        try:
            _train_group(runs, loader, manifest.run.progress)
        finally:
            loader.close()
        results.extend(TrainResult(r.manifest.name, r.paths.root, r.step, False) for r in runs)
    return results
