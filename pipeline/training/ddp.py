"""Data-parallel training (torchrun) that equals one process stepping on the same batches.

Launch: ``torchrun --nproc-per-node N $(which pipeline) train m.yaml`` (gloo for CPU
tensors, NCCL for CUDA ones). Every rank builds the same loader, so the global batch order
(a function of seed and epoch) is the same everywhere; rank ``r`` owns the contiguous rows
``rows(batch)`` of each global batch and weights its loss by its share of the rows, so the
sum of the ranks' gradients is the gradient of the global-batch mean. The loader, given
``share = (rank, world)``, gathers only those rows (the resident and memmap modes read
1/world of the rows each, and one rank decodes the memmap file while the others wait on
its lock; the stream mode still decodes every chunk of a window, since a shuffled window
spreads each rank's rows over all of its chunks); ``check_batches`` tells the context each
step's global batch size. Gradients are summed
by hand in one flat all-reduce instead of DistributedDataParallel: the coders are trained
through ``training_loss``, not ``forward``, and their batch-level state needs collectives of
its own. Rank 0 alone writes checkpoints, logs and the final coder (pipeline/training/trainer.py).

What a coder computes over the whole batch is made global for the step, so the weights
match one process to float rounding:

* layer masks: the coder's ``_training_input`` runs on the global batch (its generator is a
  function of seed and step) and the rank keeps its rows;
* BatchTopK: the threshold is the (k * global batch)-th largest pre-activation over all
  ranks (each rank sends only its own top k * batch), and the inference-threshold EMA sees
  the global minimum kept code;
* dead-latent counters: a latent fired if it fired on any rank; counters advance by the
  global batch size.

Not exact: AuxK (active only once latents are dead) normalises by the rank's own residual
variance, and the logged ``fvu`` is the rank-weighted mean of per-rank values.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.coders.activations import BatchTopK, pool_groups, unpool_groups
from pipeline.coders.base import LossOutput, SparseCoder
from pipeline.training.readers.base import rank_rows


def init_from_env() -> DistributedContext | None:
    """Join the torchrun process group when ``WORLD_SIZE > 1``; None for a single process."""
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(_destroy)
    if world <= 1:
        return None
    rank = dist.get_rank()
    return DistributedContext(rank, world, int(os.environ.get("LOCAL_RANK", rank)))


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class DistributedContext:
    """This process's place in the group, and the collectives one training step needs."""

    rank: int
    world: int
    local_rank: int
    n_tokens: int | None = None  # the training split and batch size, once ``check_batches``
    batch_size: int | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, batch: int) -> slice:
        """This rank's contiguous rows of a global batch (sizes differ by at most one)."""
        return rank_rows(batch, self.rank, self.world)

    @property
    def share(self) -> tuple[int, int]:
        """What the loader needs to gather only this rank's rows."""
        return self.rank, self.world

    def global_rows(self, step: int) -> int | None:
        """Rows of step ``step``'s global batch (the last of an epoch is short); None
        before ``check_batches`` has told the split."""
        if self.n_tokens is None or self.batch_size is None:
            return None
        per_epoch = -(-self.n_tokens // self.batch_size)
        return min(self.batch_size, self.n_tokens - step % per_epoch * self.batch_size)

    def device(self, device: torch.device) -> torch.device:
        """Each CUDA rank owns the GPU ``LOCAL_RANK`` of its node; CPU ranks share the CPU."""
        if device.type != "cuda":
            return device
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    def check_batches(self, n_tokens: int, batch_size: int) -> None:
        """Every global batch (the last of an epoch too) must give each rank a row; the
        split is remembered for ``global_rows``."""
        self.n_tokens, self.batch_size = n_tokens, batch_size
        smallest = min(batch_size, n_tokens % batch_size or batch_size)
        if smallest < self.world:
            raise ValueError(
                f"training.batch_size: {batch_size} over {n_tokens} training tokens gives a "
                f"batch of {smallest} rows, fewer than the {self.world} ranks; change "
                f"batch_size or the number of processes"
            )

    def sync_run(self, coder: SparseCoder, step: int) -> None:
        """Check every rank resumed at the same step; start from rank 0's weights."""
        steps = torch.tensor([step, -step])
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        if int(steps[0]) != -int(steps[1]):
            raise RuntimeError(
                f"ranks resumed at different steps ({-int(steps[1])}..{int(steps[0])}): "
                f"every rank must see the same run directory"
            )
        for tensor in coder.state_dict().values():
            dist.broadcast(tensor, src=0)
        coder.forget_firing_bound()

    def training_loss(
        self, coder: SparseCoder, batch: Tensor, step: int, total_steps: int
    ) -> LossOutput:
        """This rank's part of the global-batch loss (weighted by its share of the rows);
        the logged terms are averaged over ranks. ``batch`` is the global batch, or this
        rank's rows of it (a loader with ``share``): told apart by ``global_rows(step)``."""
        if not isinstance(coder, SparseCoder):
            raise TypeError(f"distributed training needs a SparseCoder, not {type(coder)}")
        global_rows = self.global_rows(step) or batch.shape[0]
        rows = self.rows(global_rows)
        if batch.shape[0] == global_rows:
            local = batch[rows]
        elif batch.shape[0] == rows.stop - rows.start:
            local = batch
        else:
            raise ValueError(
                f"step {step}: a batch of {batch.shape[0]} rows is neither the global batch "
                f"({global_rows}) nor rank {self.rank}'s {rows.stop - rows.start} rows of it"
            )
        share = local.shape[0] / global_rows
        with _global_batch_state(coder, global_rows, rows, self.world):
            out = coder.training_loss(local, step, total_steps)
        values = torch.stack([t.double().reshape(()) for t in out.terms.values()]) * share
        dist.all_reduce(values)  # stays on the device: floats only on the steps that log
        terms = dict(zip(out.terms, values.unbind(), strict=True))
        return LossOutput(out.loss * share, terms, out.codes)

    def reduce_gradients(self, coder: SparseCoder) -> None:
        """Sum the ranks' (share-weighted) gradients in one flat all-reduce.

        Every rank runs the same code path on the step, so the same parameters have grads."""
        grads = [p.grad for p in coder.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()


@contextmanager
def _global_batch_state(
    coder: SparseCoder, global_rows: int, rows: slice, world: int
) -> Iterator[None]:
    """For one step, shadow the coder's batch-level methods with global-batch versions.

    Instance attributes shadow the class's methods and are removed afterwards, so the coder
    (and its checkpoints) are untouched outside a distributed step."""
    coder_cls = type(coder)

    def training_input(x: Tensor, step: int, generator: torch.Generator | None):
        # the masks are drawn for the whole global batch (one draw per row, as in one
        # process); only this rank's rows hold data, the others are never used
        padded = x.new_zeros(global_rows, *x.shape[1:])
        padded[rows] = x
        x_in, token_mask = coder_cls._training_input(coder, padded, step, generator)
        return x_in[rows], None if token_mask is None else token_mask[rows]

    @torch.no_grad()
    def track_firing(f: Tensor) -> None:
        fired = (f > 0).any(0).to(torch.int32)
        dist.all_reduce(fired, op=dist.ReduceOp.MAX)
        coder.record_firing(fired.bool(), global_rows)

    shadows: list[tuple[object, str, object]] = [
        (coder, "_training_input", training_input),
        (coder, "_track_firing", track_firing),
    ]
    act = coder.activation
    if isinstance(act, BatchTopK):
        shadows.append((act, "forward", lambda pre: _batch_topk(act, pre, global_rows, world)))
        shadows.append((act, "observe", lambda codes: _observe_global(act, codes)))
    for owner, name, shadow in shadows:
        object.__setattr__(owner, name, shadow)
    try:
        yield
    finally:
        for owner, name, _ in shadows:
            object.__delattr__(owner, name)


def _batch_topk(act: BatchTopK, pre: Tensor, global_rows: int, world: int) -> Tensor:
    """BatchTopK over the global batch: keep codes at or above the global (k*B)-th value."""
    if not act.training:
        return BatchTopK.forward(act, pre)
    groups = pool_groups(pre, act.n_groups)
    keep = act.k * global_rows
    local = groups.detach().float()
    top = local.topk(min(keep, local.shape[1]), dim=-1).values
    if top.shape[1] < keep:  # a rank's rows may hold fewer than k*B codes: pad
        top = torch.nn.functional.pad(top, (0, keep - top.shape[1]), value=float("-inf"))
    gathered = [torch.empty_like(top) for _ in range(world)]
    dist.all_gather(gathered, top)
    threshold = torch.cat(gathered, dim=1).topk(keep, dim=-1).values[:, -1:]
    return unpool_groups((groups * (local >= threshold)).relu(), pre)


@torch.no_grad()
def _observe_global(act: BatchTopK, codes: Tensor) -> None:
    """Update the inference threshold with the global minimum kept code of each group."""
    min_pos = act.min_kept_code(codes)
    dist.all_reduce(min_pos, op=dist.ReduceOp.MIN)
    act.update_threshold(min_pos)
