"""Train stage: coder manifests + a finished cache -> checkpoints. Never harvests.

Runs that share a loader signature are stepped on the same batches, so N variants read
the store once. Each run resumes from its newest valid checkpoint; a run whose ``final/``
verifies is skipped (a damaged ``final/`` is removed, with a warning, and trained again).

One process per run directory: ``train.lock`` there is taken without waiting, so a second
``pipeline train`` of the same coder stops at once with a one-line error naming the lock
(waiting would only make it find the run finished, or race it for the GPU). The lock file
is removed when the first process exits.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.coders import build_coder
from pipeline.coders.base import resolve_dead_after_tokens, terms_to_floats
from pipeline.evaluation.spectrum import train_warning
from pipeline.harvest.cache_key import cache_key
from pipeline.harvest.models import resolve_device
from pipeline.manifests.harvest import load_harvest_manifest
from pipeline.manifests.io import ManifestError, check_device, check_writable_dir
from pipeline.paths import RunPaths, default_runs_root, run_dir
from pipeline.store.catalog import find_store, write_run_name
from pipeline.store.format import atomic_write_json, tree_bytes
from pipeline.store.locks import exclusive_lock
from pipeline.store.outliers import excluded_rows, outlier_scan
from pipeline.store.reader import ActivationStore, StoreError
from pipeline.store.writer import (
    check_free_space,
    disk_full_as_one_line,
    free_bytes,
    human_bytes,
)
from pipeline.training.checkpoint import CheckpointError, verify_checkpoint, warn
from pipeline.training.ddp import init_from_env
from pipeline.training.loader import ActivationLoader, split_rows
from pipeline.training.manifest import CoderManifest, check_coder_section
from pipeline.training.readers.budget import resident_budget
from pipeline.training.run_record import RunRecord
from pipeline.training.trainer import KEEP_CHECKPOINTS, CoderRun, new_coder_run
from pipeline.training.validation import held_out_terms, validation_sample


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
        if "pipeline harvest" in str(err):  # a damaged store's message already says how
            raise
        raise StoreError(
            f"{err}; the cache for {harvest_path} is not ready: "
            f"run `pipeline harvest {harvest_path}`"
        ) from None


def store_layers(manifest: CoderManifest, store: ActivationStore) -> list[int]:
    """The manifest's layers as indices into the store's hooks, checked against it."""
    if manifest.layers == "all":
        return list(range(store.n_layers))
    bad = [layer for layer in manifest.layers if layer >= store.n_layers]
    if bad:
        raise ManifestError(
            f"coder manifest '{manifest.name}': field 'layers': {bad} out of range: the cache "
            f"has {store.n_layers} hooks (0..{store.n_layers - 1})"
        )
    return list(manifest.layers)


def check_runnable(manifest: CoderManifest, store: ActivationStore, train_tokens: int) -> None:
    """What only this machine and this store can tell, before any training starts."""
    label = f"coder manifest '{manifest.name}'"
    check_device(manifest.run.device, f"{label}: field 'run.device'")
    runs_root = manifest.run.runs_root or default_runs_root()
    check_writable_dir(runs_root, f"{label}: field 'run.runs_root'")
    if manifest.training.batch_size > train_tokens:
        raise ManifestError(
            f"{label}: field 'training.batch_size': {manifest.training.batch_size} is more than "
            f"the {train_tokens} training tokens of cache {store.key}"
        )


OPTIMIZER_COPIES = 3  # bytes per parameter beside the weights: gradient, Adam's two moments
CHECKPOINTS_ON_DISK = KEEP_CHECKPOINTS + 1  # the kept ones plus the one being written


def coder_size(config) -> tuple[int, int]:
    """(parameters, buffer elements) of the coder ``config`` builds, counted on the meta
    device: nothing is allocated, so a coder too big for the machine is refused, not built.
    (The first meta build imports torch._dynamo, ~2.4 s here: ``size_bound`` comes first.)"""
    with torch.device("meta"):
        coder = build_coder(config)
    return (
        sum(p.numel() for p in coder.parameters()),
        sum(b.numel() for b in coder.buffers()),
    )


def size_bound(config) -> tuple[int, int]:
    """A cheap upper bound on ``coder_size``: twice a dense encoder + decoder over every
    latent and layer, plus every factor of rank R, plus biases; buffers a few per latent."""
    layers, d = config.n_layers, config.d_model
    latents = getattr(config, "n_latents", None) or layers * config.latents_per_layer
    rank = getattr(config, "rank", None) or 0
    factors = 2 * rank * (latents * layers + latents * d + layers + d)
    return 4 * latents * layers * d + factors + 2 * (latents + layers * d), 8 * latents


def check_resources(manifest: CoderManifest, config, paths: RunPaths) -> None:
    """Weights + gradient + Adam state must fit the device, and the checkpoints the disk;
    else one line with the figures, before the run directory exists."""
    device = resolve_device(manifest.run.device)
    available = resident_budget(device, fraction=1.0)
    free = free_bytes(paths.root)

    def needs(params: int, buffers: int) -> tuple[int, int]:
        memory = 4 * (params * (1 + OPTIMIZER_COPIES) + buffers)
        return memory, 4 * params * (CHECKPOINTS_ON_DISK * OPTIMIZER_COPIES + 1)

    params, buffers = size_bound(config)
    memory, disk = needs(params, buffers)
    if memory <= available and disk <= free:
        return  # fits even at the bound: no need to count exactly
    params, buffers = coder_size(config)
    memory, disk = needs(params, buffers)
    if memory > available:
        raise MemoryBudgetError(
            f"coder manifest '{manifest.name}': field 'coder.n_latents': {params:,} parameters "
            f"need about {human_bytes(memory)} for weights, gradients and Adam state; "
            f"{human_bytes(available)} is available on {device}"
        )
    existing = tree_bytes(paths.root) if paths.root.is_dir() else 0
    check_free_space(paths.root, disk - existing, f"run '{manifest.name}' (checkpoints + final)")


class MemoryBudgetError(ValueError):
    """A coder that would not fit in memory; the one-line message gives the figures."""


def run_paths(manifest: CoderManifest, cache: str) -> RunPaths:
    """Where a coder manifest's run lives: runs root / cache key / hash of its weights' spec."""
    root = Path(manifest.run.runs_root) if manifest.run.runs_root else default_runs_root()
    return RunPaths(run_dir(root, cache, manifest.run_hash()))


def _log(
    run: CoderRun, terms: dict, tokens_per_second: float | None, writer, wandb_run=None
) -> dict[str, float]:
    """One metrics.jsonl line; the only place the step's device terms become floats."""
    record = {"step": run.step, "tokens": run.step * run.manifest.training.batch_size}
    record.update(terms_to_floats(terms))
    if tokens_per_second is not None:
        record["tokens_per_second"] = tokens_per_second
    with run.paths.metrics.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    run.last_log = record
    if writer is not None:
        for key, value in record.items():
            if key != "step":
                writer.add_scalar(key, value, run.step)
    if wandb_run is not None:
        wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=run.step)
    return record


def _wandb(run: CoderRun):
    """A W&B run when the manifest asks for one (``run.wandb``); wandb is imported only then."""
    spec = run.manifest.run.wandb
    if spec is None:
        return None
    try:
        import wandb
    except ImportError:
        raise ValueError(
            f"{run.manifest.name}: run.wandb is set but wandb is not installed "
            "(pip install wandb, or remove run.wandb)"
        ) from None
    return wandb.init(
        project=spec.project,
        entity=spec.entity,
        mode=spec.mode,
        name=run.manifest.name,
        id=f"{run.cache_key}-{run.paths.root.name}",  # a resumed run continues its W&B run
        resume="allow",
        dir=str(run.paths.root),
        config=json.loads(run.paths.manifest.read_text()) if run.paths.manifest.is_file() else {},
        reinit=True,
    )


def _tensorboard(run: CoderRun):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional at run time
        return None
    return SummaryWriter(str(run.paths.tensorboard), purge_step=run.step or None)


def _train_group(
    runs: list[CoderRun],
    loader: ActivationLoader,
    progress: bool,
    held_out: torch.Tensor | None = None,
) -> None:
    """Step every unfinished run of the group on the same batch stream; every
    ``eval_every`` steps and at the end, add ``val_fvu``/``val_l0`` on ``held_out``."""
    for run in runs:
        if run.done and run.total_steps == 0:  # an untrained control: log its held-out
            if run.is_main and held_out is not None:  # terms at step 0, then save it
                _log(run, held_out_terms(run.coder, held_out), None, None)
            run.save_final()
    active = [r for r in runs if not r.done]
    if not active:
        return
    start = min(r.step for r in active)
    total = max(r.total_steps for r in active)
    per_epoch = loader.steps_per_epoch()
    main = all(r.is_main for r in active)  # torchrun: rank 0 alone logs
    writers = {id(r): _tensorboard(r) if main else None for r in active}
    wandb_runs = {id(r): _wandb(r) if main else None for r in active}
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
                    validate = held_out is not None and (
                        run.step % spec.eval_every == 0 or run.done
                    )
                    if validate:
                        terms.update(held_out_terms(run.coder, held_out))
                    if main and (run.step % spec.log_every == 0 or validate or run.done):
                        now = time.perf_counter()
                        elapsed = max(now - run.log_time, 1e-9)
                        rate = (run.step - run.log_step) * spec.batch_size / elapsed
                        run.log_time, run.log_step = now, run.step
                        logged = _log(run, terms, rate, writers[id(run)], wandb_runs[id(run)])
                        if len(active) == 1 or run is active[0]:  # the bar shows one run
                            bar.set_postfix(
                                loss=f"{logged['loss']:.4g}",
                                fvu=f"{logged['fvu']:.3f}",
                                l0=f"{logged['l0']:.1f}",
                                refresh=False,
                            )
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
        for wandb_run in wandb_runs.values():
            if wandb_run is not None:
                wandb_run.finish()
    for run in active:
        run.save_final()


def run(manifests: list[tuple[CoderManifest, Path]]) -> list[TrainResult]:
    """Train every manifest (``(manifest, base dir for relative paths)``) from its cache.

    Under torchrun (WORLD_SIZE > 1) every rank trains its rows of each batch
    (pipeline/training/ddp.py).
    """
    with ExitStack() as locks:
        return _run_locked(manifests, locks)


def _is_trained(paths: RunPaths, main: bool) -> bool:
    """``final/`` counts only when its checksums verify; a damaged one is removed (rank 0)."""
    if not paths.final.is_dir():
        return False
    try:
        verify_checkpoint(paths.final)
        return True
    except CheckpointError as err:
        if main:
            warn(f"{paths.final} is not a complete checkpoint ({err}); training it again")
            shutil.rmtree(paths.final)
        return False


def _run_locked(manifests: list[tuple[CoderManifest, Path]], locks: ExitStack) -> list[TrainResult]:
    dist = init_from_env()
    main = dist is None or dist.is_main
    groups: dict[tuple, list[CoderRun]] = defaultdict(list)
    stores: dict[tuple, tuple[ActivationStore, list[int], CoderManifest]] = {}
    results = []
    opened: dict[tuple, ActivationStore] = {}  # variants of one cache: hash and open it once
    checked = []
    train_tokens: dict[tuple[str, float], int] = {}
    for manifest, base in manifests:  # every manifest checked before any run starts
        ref = manifest.cache
        where = (ref.key or base / ref.harvest_manifest, ref.root)
        if where not in opened:
            opened[where] = open_cache(manifest, base)
        store = opened[where]
        layers = store_layers(manifest, store)
        config = check_coder_section(manifest, len(layers), store.d_model, manifest.name)
        if config.dead_after_tokens is None:  # recorded resolved in run.json and coder.json
            spec = manifest.training
            window = resolve_dead_after_tokens(spec.tokens, spec.batch_size)
            config = config.model_copy(update={"dead_after_tokens": window})
        fraction = manifest.training.validation_fraction
        ratio = manifest.training.outlier_norm_ratio
        if (store.key, fraction, ratio) not in train_tokens:
            excluded = excluded_rows(outlier_scan(store, ratio))
            rows = split_rows(store, "train", validation_fraction=fraction, exclude=excluded)
            train_tokens[store.key, fraction, ratio] = len(rows)
        check_runnable(manifest, store, train_tokens[store.key, fraction, ratio])
        check_resources(manifest, config, run_paths(manifest, store.key))
        checked.append((manifest, store, layers, config))
    same_run: dict[Path, list[str]] = {}  # run dir -> the names of manifests that share it
    for manifest, store, layers, config in checked:
        paths = run_paths(manifest, store.key)
        if paths.root in same_run:  # same settings, another name: one run, both names kept
            same_run[paths.root].append(manifest.name)
            if main:
                write_run_name(paths.root, manifest.name)
            continue
        same_run[paths.root] = [manifest.name]
        if main:
            locks.enter_context(exclusive_lock(paths.lock, wait=False, what="`pipeline train`"))
        if _is_trained(paths, main):
            if main:
                write_run_name(paths.root, manifest.name)
            results.append(TrainResult(manifest.name, paths.root, manifest.total_steps(), True))
            continue
        if dist is None or dist.is_main:
            spec = manifest.training
            line = train_warning(
                manifest.name, config, store, layers, spec.centre, spec.outlier_norm_ratio
            )
            if line:
                print(line, file=sys.stderr, flush=True)
        device = resolve_device(manifest.run.device)
        if dist is not None:
            device = dist.device(device)
        spec = manifest.training
        signature = (
            store.key,
            tuple(layers),
            spec.batch_size,
            spec.seed,
            spec.centre,
            spec.validation_fraction,
            spec.validation_tokens,
            spec.outlier_norm_ratio,
            manifest.run.loader_mode,  # the batch order depends on these too
            manifest.run.decode,
            manifest.run.stream_strata,
            str(device),
        )
        coder_run = new_coder_run(manifest, config, paths, store.key, device, dist)
        outliers = outlier_scan(store, spec.outlier_norm_ratio)
        coder_run.record = RunRecord.from_store(store, layers, spec.centre, manifest.name, outliers)
        if coder_run.is_main:
            write_run_name(paths.root, manifest.name)
        groups[signature].append(coder_run)
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
            validation_fraction=spec.validation_fraction,
            resident_max_bytes=manifest.run.resident_max_bytes,
            verbose=dist is None or dist.is_main,
            outlier_ratio=spec.outlier_norm_ratio,
            decode=manifest.run.decode,
            share=None if dist is None else dist.share,
            stream_strata=manifest.run.stream_strata,
        )
        held_out = validation_sample(
            store,
            layers,
            tokens=spec.validation_tokens,
            fraction=spec.validation_fraction,
            centre=spec.centre,
            device=torch.device(signature[-1]),
            outlier_ratio=spec.outlier_norm_ratio,
        )
        for run in runs:
            if run.is_main:
                atomic_write_json(run.paths.loader, loader.describe())
        if dist is not None:
            dist.check_batches(loader.n_tokens, spec.batch_size)
        try:
            with disk_full_as_one_line(runs[0].paths.root, "checkpoints"):
                _train_group(runs, loader, manifest.run.progress, held_out)
        finally:
            loader.close()
        results.extend(TrainResult(r.manifest.name, r.paths.root, r.step, False) for r in runs)
    return [
        TrainResult(alias, r.run_dir, r.steps, r.skipped)
        for r in results
        for alias in same_run.get(r.run_dir, [r.name])
    ]
