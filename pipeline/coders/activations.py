"""Activation functions, their sparsity penalties, and the AuxK dead-latent loss.

Every activation maps pre-activations ``[batch, n_groups * group_size]`` to codes of the same
shape. Groups exist so that per-layer SAEs (one group per layer) apply ``k`` per layer with
the same code that cross-layer coders (one group) use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

ActivationKind = Literal["relu", "topk", "batchtopk", "jumprelu"]


def _grouped(t: Tensor, n_groups: int) -> Tensor:
    return t.view(t.shape[0], n_groups, -1)


def topk_codes(pre: Tensor, k: int, n_groups: int = 1, ties_by_index: bool = False) -> Tensor:
    """Keep the ``k`` largest pre-activations of each token in each group (ReLU'd).

    ``ties_by_index``: where values tie at the k-th place, keep the lowest latent indices
    (``torch.topk`` picks among ties as its kernel happens to; evaluation must not). It
    costs one comparison pass, plus a sort of only the rows that tie."""
    p = _grouped(pre, n_groups)
    vals, idx = p.topk(k, dim=-1, sorted=False)
    if ties_by_index:
        idx = _lowest_index_on_ties(p, vals, idx)
        vals = p.gather(-1, idx)
    return torch.zeros_like(p).scatter(-1, idx, vals.relu()).view_as(pre)


def _lowest_index_on_ties(p: Tensor, vals: Tensor, idx: Tensor) -> Tensor:
    """``idx`` with every row whose k-th value ties with an unkept one re-chosen by a stable
    sort (equal values in index order); rows without such a tie keep their unique set."""
    kth = vals.amin(-1, keepdim=True)
    tied = (p >= kth).sum(-1) > idx.shape[-1]
    if not bool(tied.any()):  # one sync per batch: evaluation only, never the training step
        return idx
    idx = idx.clone()
    order = torch.sort(p[tied], dim=-1, descending=True, stable=True).indices
    idx[tied] = order[:, : idx.shape[-1]]
    return idx


def pool_groups(t: Tensor, n_groups: int) -> Tensor:
    """``[batch, G * m]`` -> ``[G, batch * m]``: each group's values over the whole batch
    in one row (BatchTopK selects there; pipeline/training/ddp.py does too, across ranks)."""
    return _grouped(t, n_groups).transpose(0, 1).reshape(n_groups, -1)


def unpool_groups(pooled: Tensor, like: Tensor) -> Tensor:
    """The inverse of ``pool_groups``, shaped like ``like`` (``[batch, G * m]``)."""
    return pooled.view(pooled.shape[0], like.shape[0], -1).transpose(0, 1).reshape_as(like)


def batch_topk_codes(pre: Tensor, k: int, n_groups: int = 1) -> Tensor:
    """Keep the ``k * batch`` largest pre-activations of each group over the whole batch."""
    p = pool_groups(pre, n_groups)  # [G, B * m]
    vals, idx = p.topk(k * pre.shape[0], dim=-1, sorted=False)
    return unpool_groups(torch.zeros_like(p).scatter(-1, idx, vals.relu()), pre)


class Activation(nn.Module):
    """Base: elementwise or grouped sparse activation; ``observe`` sees training codes."""

    def __init__(self, n_groups: int, group_size: int) -> None:
        super().__init__()
        self.n_groups = n_groups
        self.group_size = group_size

    def observe(self, codes: Tensor) -> None:
        """Update inference statistics from the codes of one training batch (default: none)."""


class ReLU(Activation):
    def forward(self, pre: Tensor) -> Tensor:
        return pre.relu()


class TopK(Activation):
    def __init__(self, n_groups: int, group_size: int, k: int) -> None:
        super().__init__(n_groups, group_size)
        self.k = k

    def forward(self, pre: Tensor) -> Tensor:
        return topk_codes(pre, self.k, self.n_groups, ties_by_index=not self.training)


class BatchTopK(Activation):
    """Top ``k * batch`` per group in training; a tracked threshold at inference.

    The threshold is an EMA of the smallest positive code kept in each training batch
    (Bussmann et al.), so that inference is per-token and batch-independent. Before the
    first training batch has been observed, inference falls back to per-token TopK.
    """

    def __init__(self, n_groups: int, group_size: int, k: int, momentum: float) -> None:
        super().__init__(n_groups, group_size)
        self.k = k
        self.momentum = momentum
        self.register_buffer("threshold", torch.zeros(n_groups))
        self.register_buffer("threshold_updates", torch.zeros(n_groups, dtype=torch.long))

    def forward(self, pre: Tensor) -> Tensor:
        if self.training:
            return batch_topk_codes(pre, self.k, self.n_groups)
        if bool((self.threshold_updates == 0).any()):
            return topk_codes(pre, self.k, self.n_groups, ties_by_index=True)
        p = _grouped(pre, self.n_groups)
        thr = self.threshold.to(pre.dtype)[None, :, None]
        return (p * (p > thr)).relu().view_as(pre)

    @torch.no_grad()
    def observe(self, codes: Tensor) -> None:
        self.update_threshold(self.min_kept_code(codes))

    @torch.no_grad()
    def min_kept_code(self, codes: Tensor) -> Tensor:
        """Each group's smallest positive code in the batch, ``inf`` where none fired."""
        f = pool_groups(codes.detach(), self.n_groups)
        return torch.where(f > 0, f, torch.full_like(f, float("inf"))).amin(-1).float()

    @torch.no_grad()
    def update_threshold(self, min_pos: Tensor) -> None:
        """The EMA step from ``min_kept_code`` (of one batch, or the global batch under DDP).

        Tensor ops only (no .item()): this runs every step and must not sync the GPU."""
        valid = torch.isfinite(min_pos)
        ema = self.momentum * self.threshold + (1 - self.momentum) * min_pos
        new = torch.where(self.threshold_updates == 0, min_pos, ema)
        self.threshold.copy_(torch.where(valid, new, self.threshold))
        self.threshold_updates.add_(valid.long())


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLUFn(torch.autograd.Function):
    """``z * H(z - theta)``; d/dtheta uses the rectangle-kernel pseudo-derivative."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_pre = grad * (pre > threshold)
        grad_thr = -(threshold / bw) * _rectangle((pre - threshold) / bw) * grad
        return grad_pre, grad_thr.sum(0), None


class _StepFn(torch.autograd.Function):
    """``H(z - theta)``; no gradient to ``z``, pseudo-derivative to ``theta``."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_thr = -(1.0 / bw) * _rectangle((pre - threshold) / bw) * grad
        return None, grad_thr.sum(0), None


class JumpReLU(Activation):
    """JumpReLU with a learned per-latent threshold (Rajamanoharan et al. 2024).

    The threshold is stored as its log so it stays positive; it learns through the
    straight-through pseudo-derivatives of width ``bandwidth``.
    """

    def __init__(self, n_groups: int, group_size: int, init_threshold: float, bandwidth: float):
        super().__init__(n_groups, group_size)
        self.bandwidth = bandwidth
        n = n_groups * group_size
        self.log_threshold = nn.Parameter(torch.full((n,), float(init_threshold)).log())

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def forward(self, pre: Tensor) -> Tensor:
        return _JumpReLUFn.apply(pre, self.threshold.to(pre.dtype), self.bandwidth)

    def l0_penalty(self, pre: Tensor) -> Tensor:
        """Mean over the batch of the number of active latents, differentiable in theta."""
        step = _StepFn.apply(pre, self.threshold.to(pre.dtype), self.bandwidth)
        return step.sum(-1).mean()


def l1_penalty(codes: Tensor, decoder_norm_sums: Tensor) -> Tensor:
    """``sum_i f_i * sum_l ||W_dec[i, l]||``, mean over the batch (Anthropic's crosscoder L1)."""
    return (codes * decoder_norm_sums).sum(-1).mean()


def auxk_loss(
    pre: Tensor,
    dead: Tensor,
    residual: Tensor,
    decode: Callable[[Tensor], Tensor],
    k_aux: int,
    n_groups: int = 1,
) -> Tensor:
    """OpenAI's AuxK: reconstruct the detached residual with the top ``k_aux`` dead latents.

    ``dead`` is a bool mask over latents; ``decode`` maps codes to ``[batch, L, d]`` without
    the decoder bias. The squared error is normalised by the residual's variance and scaled
    down by ``min(n_dead / (k_aux * n_groups), 1)`` as in the reference implementation.
    """
    group_size = pre.shape[-1] // n_groups
    codes = topk_codes(pre.masked_fill(~dead, float("-inf")), min(k_aux, group_size), n_groups)
    e_hat = decode(codes)
    l2 = (e_hat - residual).pow(2).sum()
    total_var = (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
    scale = (dead.sum() / (k_aux * n_groups)).clamp(max=1.0)
    return scale * l2 / total_var


def build_activation(
    kind: ActivationKind,
    n_groups: int,
    group_size: int,
    *,
    k: int | None = None,
    batchtopk_momentum: float = 0.99,
    jumprelu_init_threshold: float = 1e-3,
    jumprelu_bandwidth: float = 1e-3,
) -> Activation:
    if kind == "relu":
        return ReLU(n_groups, group_size)
    if kind == "topk":
        assert k is not None, "topk needs k"
        return TopK(n_groups, group_size, k)
    if kind == "batchtopk":
        assert k is not None, "batchtopk needs k"
        return BatchTopK(n_groups, group_size, k, batchtopk_momentum)
    if kind == "jumprelu":
        return JumpReLU(n_groups, group_size, jumprelu_init_threshold, jumprelu_bandwidth)
    raise ValueError(f"unknown activation {kind!r}")
