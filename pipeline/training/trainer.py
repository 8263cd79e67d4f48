"""Training one or several coders on the same stream of batches.

Variants that share a loader signature (cache, layers, batch size, seed, centring) are
stepped together on each batch, so the store is read once for all of them. Every source
of randomness is a function of (seed, step): a resumed run replays the same batches
and the same masks and ends with the same weights.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.coders import build_coder
from pipeline.coders.base import Coder
from pipeline.paths import RunPaths
from pipeline.store.catalog import SUMMARY_FILE
from pipeline.store.format import atomic_write_bytes, atomic_write_json
from pipeline.training.checkpoint import (
    OPTIMIZER_FILE,
    CheckpointError,
    fault_point,
    flatten_state,
    load_coder,
    load_training_state,
    save_coder,
    save_training_state,
    seal_checkpoint,
    unflatten_state,
    verify_checkpoint,
    warn,
)
from pipeline.training.manifest import CoderManifest, TrainingSpec

if TYPE_CHECKING:
    from pipeline.training.ddp import DistributedContext
    from pipeline.training.run_record import RunRecord


class NonFiniteLossError(ValueError):
    """A loss became inf or NaN; the one-line message names the run and the step."""


KEEP_CHECKPOINTS = 2  # the newest, and one to resume from if the newest is damaged

# <run>/step_time.json: the median step time of the session that finished the run. Beside
# metrics.jsonl, not in final/: wall time differs between identical runs, final/ must not.
STEP_TIME_FILE = "step_time.json"
# Steps left out at the start of a session: the allocator, thread pool and kernel choice
# settle over the first few (on CPU the first step takes several times the median).
STEP_TIME_WARMUP = 3


class StepTimer:
    """Wall time of each training step (forward, backward, optimiser), nothing else:
    batch loading, validation and checkpoints happen outside it. On an accelerator the
    step is timed by device events, read only at steps that synchronise anyway."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: list[float] = []
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._started: float | torch.cuda.Event | None = None

    def start(self) -> None:
        if self.device.type == "cuda":
            self._started = torch.cuda.Event(enable_timing=True)
            self._started.record()
        else:
            self._started = time.perf_counter()

    def stop(self) -> None:
        if isinstance(self._started, torch.cuda.Event):
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((self._started, end))
        elif self._started is not None:
            self.seconds.append(time.perf_counter() - self._started)
        self._started = None

    def resolve(self) -> None:
        """Turn recorded device events into seconds (waits for the last one)."""
        if self._pending:
            self._pending[-1][1].synchronize()
            self.seconds += [a.elapsed_time(b) / 1000 for a, b in self._pending]
            self._pending.clear()

    def summary(self) -> dict | None:
        """Median seconds per step past the warm-up steps, or None when too few ran."""
        self.resolve()
        timed = self.seconds[STEP_TIME_WARMUP:]
        if not timed:
            return None
        return {
            "median_s": statistics.median(timed),
            "steps_timed": len(timed),
            "warmup_steps_excluded": STEP_TIME_WARMUP,
            "device": str(self.device),
            "threads": torch.get_num_threads(),
        }


def read_step_time(run_dir: Path) -> dict | None:
    """A run's ``step_time.json`` (``StepTimer.summary``), or None when it has none."""
    path = Path(run_dir) / STEP_TIME_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def lr_factor(step: int, total: int, spec: TrainingSpec) -> float:
    warmup = int(spec.warmup_fraction * total)
    if step < warmup:
        return (step + 1) / warmup
    decay_start = total - int(spec.decay_fraction * total)
    if spec.decay == "constant" or step < decay_start:
        return 1.0
    progress = (step - decay_start) / max(1, total - decay_start)
    if spec.decay == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class CoderRun:
    """One coder being trained: its weights, optimiser, schedule and files."""

    manifest: CoderManifest
    coder: Coder
    paths: RunPaths
    cache_key: str
    device: torch.device
    step: int = 0
    optimizer: torch.optim.Optimizer = field(init=False)
    log_time: float = field(default_factory=time.perf_counter)
    log_step: int = 0
    dist: DistributedContext | None = None  # torchrun: this rank's place (pipeline/training/ddp.py)
    record: RunRecord | None = None  # normalisation + provenance, saved beside the final weights
    last_log: dict | None = None  # the last metrics.jsonl row: final/summary.json's figures
    first_bad_step: torch.Tensor | None = None  # on the device: first non-finite loss, or -1
    timer: StepTimer = field(init=False)

    def __post_init__(self) -> None:
        spec = self.manifest.training
        self.timer = StepTimer(self.device)
        self.coder.to(self.device)
        self.optimizer = torch.optim.Adam(
            self.coder.parameters(), lr=spec.lr, betas=(spec.beta1, spec.beta2)
        )

    @property
    def total_steps(self) -> int:
        return self.manifest.total_steps()

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (rank 0, or no distributed run)."""
        return self.dist is None or self.dist.is_main

    def autocast(self):
        precision = self.manifest.training.precision
        use_bf16 = precision == "bfloat16" or (precision == "auto" and self.device.type == "cuda")
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16)

    def train_step(self, batch: torch.Tensor) -> dict[str, float]:
        spec = self.manifest.training
        self.timer.start()
        for group in self.optimizer.param_groups:
            group["lr"] = spec.lr * lr_factor(self.step, self.total_steps, spec)
        with self.autocast():
            if self.dist is None:
                out = self.coder.training_loss(batch, self.step, self.total_steps)
            else:  # this rank's rows of the global batch (pipeline/training/ddp.py)
                out = self.dist.training_loss(self.coder, batch, self.step, self.total_steps)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.dist is not None:
            self.dist.reduce_gradients(self.coder)
        if spec.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.coder.parameters(), spec.grad_clip)
        self.optimizer.step()
        self._note_non_finite(out.loss)
        self.timer.stop()
        self.step += 1
        if self.step % spec.log_every == 0 or self.step % spec.checkpoint_every == 0 or self.done:
            self.check_finite()
            self.timer.resolve()  # check_finite has synchronised: the events are done
        return {**out.terms, "lr": self.optimizer.param_groups[0]["lr"]}

    def _note_non_finite(self, loss: torch.Tensor) -> None:
        """Remember the first step whose loss is inf/NaN without a host sync per step."""
        bad = ~torch.isfinite(loss.detach())
        if self.first_bad_step is None:
            self.first_bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        unseen = self.first_bad_step < 0
        self.first_bad_step = torch.where(bad & unseen, self.step, self.first_bad_step)

    def check_finite(self) -> None:
        """Stop (before any checkpoint or final/ is written) once a loss was not finite, so
        the last checkpoint written is the last good one."""
        if self.first_bad_step is None or int(self.first_bad_step) < 0:
            return
        kept = self.paths.checkpoints()
        where = f"{kept[0].name} is the last good checkpoint" if kept else "no checkpoint kept"
        raise NonFiniteLossError(
            f"{self.paths.root}: run '{self.manifest.name}': the loss was not finite at step "
            f"{int(self.first_bad_step)}; stopped at step {self.step} ({where}); lower "
            "training.lr or check the cache"
        )

    def save_checkpoint(self) -> None:
        """A new directory per checkpoint, sealed by its checksums last; the oldest goes only
        once it is complete, and the previous one stays as a fallback if this one is damaged."""
        if not self.is_main:
            return
        target = self.paths.checkpoint(self.step)
        tensors, skeleton = flatten_state(self.optimizer.state_dict())
        save_coder(target, self.coder, {"step": self.step}, seal=False)
        save_training_state(
            target / OPTIMIZER_FILE, tensors, {"step": self.step, "skeleton": skeleton}
        )
        seal_checkpoint(target)
        for old in self.paths.checkpoints()[KEEP_CHECKPOINTS:]:
            shutil.rmtree(old, ignore_errors=True)

    def save_final(self) -> None:
        """``final/``: weights, normalisation and ``summary.json`` (the last logged figures,
        so ``pipeline runs`` reports only what the checksums cover), sealed last."""
        if not self.is_main:
            return
        self.paths.final.mkdir(parents=True, exist_ok=True)
        fault_point("started", self.paths.final)
        if self.last_log is not None:
            figures = {k: v for k, v in self.last_log.items() if k != "tokens_per_second"}
            atomic_write_json(self.paths.final / SUMMARY_FILE, figures)
        extra = {
            "step": self.step,
            "name": self.manifest.name,
            "cache_key": self.cache_key,
            "manifest": self.manifest.model_dump(mode="json"),
        }
        # final/ then works without the cache (pipeline/training/export.py)
        if self.record is not None:
            extra.update(self.record.metadata())
            self.record.write(self.paths.final)
        save_coder(self.paths.final, self.coder, extra)
        timing = self.timer.summary()
        if timing is not None:
            atomic_write_json(self.paths.root / STEP_TIME_FILE, {**timing, "step": self.step})

    def try_resume(self) -> None:
        """Load the newest checkpoint that verifies, and cut the metric log back to it.

        A damaged or incomplete checkpoint is skipped with a one-line warning naming it;
        with none left the run starts from step 0, says so, and drops every logged row."""
        skipped = []
        for directory in self.paths.checkpoints():
            try:
                self._load_checkpoint(directory)
            except (CheckpointError, KeyError, ValueError, RuntimeError) as err:
                if self.is_main:
                    warn(f"skipping checkpoint {directory.name}: {err}")
                skipped.append(directory)
                continue
            if self.is_main:
                _truncate_log(self.paths.metrics, self.step)
            return
        if skipped and self.is_main:
            warn(f"{self.paths.root}: no valid checkpoint left; training from step 0")
        self.step = 0
        if self.is_main:  # a fresh start keeps nothing of an earlier attempt's logs
            _truncate_log(self.paths.metrics, 0)
            shutil.rmtree(self.paths.tensorboard, ignore_errors=True)

    def _load_checkpoint(self, directory: Path) -> None:
        verify_checkpoint(directory)
        if not (directory / OPTIMIZER_FILE).is_file():
            raise CheckpointError(f"{directory / OPTIMIZER_FILE}: missing")
        coder = load_coder(directory, verify=False)  # just verified
        tensors, meta = load_training_state(directory / OPTIMIZER_FILE)
        tensors = {k: v.to(self.device) for k, v in tensors.items()}
        self.optimizer.load_state_dict(unflatten_state(tensors, meta["skeleton"]))
        self.coder.load_state_dict(coder.state_dict())
        self.coder.to(self.device)
        self.step = int(meta["step"])


def _truncate_log(path: Path, step: int) -> None:
    """Keep the rows up to ``step`` (a row cut short by a kill is dropped too)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line + "\n")
    atomic_write_bytes(path, "".join(kept).encode())


def new_coder_run(
    manifest: CoderManifest,
    config,
    paths: RunPaths,
    cache_key: str,
    device: torch.device,
    dist: DistributedContext | None = None,
) -> CoderRun:
    paths.root.mkdir(parents=True, exist_ok=True)
    if dist is None or dist.is_main:
        atomic_write_json(
            paths.manifest,
            {
                "cache_key": cache_key,
                "manifest": manifest.model_dump(mode="json"),
                "coder": config.model_dump(mode="json"),
            },
        )
    run = CoderRun(manifest, build_coder(config), paths, cache_key, device, dist=dist)
    run.try_resume()
    if dist is not None:
        dist.sync_run(run.coder, run.step)
    return run
