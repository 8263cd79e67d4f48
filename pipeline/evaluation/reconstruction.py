"""Reconstruction and sparsity metrics as streaming accumulators: one pass over the eval set.

Inputs are normalised activations ``x[B, L, d]`` (layer ``l`` multiplied by ``scale[l]``,
optionally centred); errors are reported in raw units by dividing by ``scale[l]``. FVU is the
residual energy over the variance around the per-layer mean of the eval tokens (not around
zero, a known bug in other suites), accumulated as shifted sums so no second pass is needed.
Special tokens are the caller's to drop, or pass ``keep``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pipeline.coders.base import Coder

DENSE_THRESHOLD = 0.1


def _kept(t: Tensor, keep: Tensor | None) -> Tensor:
    return t if keep is None else t[keep.to(torch.bool)]


@dataclass(frozen=True)
class ReconstructionResult:
    """Per-layer MSE (raw units, per dimension) and FVU, and their means over layers."""

    mse: np.ndarray  # [L]
    fvu: np.ndarray  # [L]
    mse_mean: float
    fvu_mean: float
    n_tokens: int


class ReconstructionAccumulator:
    """Sums ``||x - x_hat||^2`` and shifted moments of ``x`` per layer in float64."""

    def __init__(self, scale: Tensor) -> None:
        self.scale = scale.detach().double().cpu()
        n_layers = self.scale.numel()
        self.err = torch.zeros(n_layers, dtype=torch.float64)
        self.sum = torch.zeros(n_layers, 0, dtype=torch.float64)  # sized on first update
        self.sum_sq = torch.zeros(n_layers, dtype=torch.float64)
        self.shift: Tensor | None = None
        self.n = 0
        self.d = 0

    def update(self, x: Tensor, x_hat: Tensor, keep: Tensor | None = None) -> None:
        x = _kept(x, keep).detach().cpu().double()
        x_hat = _kept(x_hat, keep).detach().cpu().double()
        if x.shape[0] == 0:
            return
        inv = (1.0 / self.scale).view(1, -1, 1)
        x_raw, diff = x * inv, (x - x_hat) * inv
        if self.shift is None:
            # Shifting by the first batch's mean avoids cancellation in sum_sq - n * mean^2
            # when raw residuals carry a large mean (massive activations).
            self.shift = x_raw.mean(0)
            self.sum = torch.zeros_like(self.shift)
            self.d = x.shape[-1]
        centred = x_raw - self.shift
        self.err += diff.pow(2).sum(dim=(0, 2))
        self.sum += centred.sum(0)
        self.sum_sq += centred.pow(2).sum(dim=(0, 2))
        self.n += x.shape[0]

    def result(self) -> ReconstructionResult:
        if self.n == 0:
            raise ValueError("ReconstructionAccumulator.result: no tokens were accumulated")
        variance = self.sum_sq - self.sum.pow(2).sum(-1) / self.n
        mse = (self.err / (self.n * self.d)).numpy()
        fvu = (self.err / variance.clamp_min(1e-30)).numpy()
        return ReconstructionResult(mse, fvu, float(mse.mean()), float(fvu.mean()), self.n)


@dataclass(frozen=True)
class SparsityResult:
    """L0 per token (a crosscoder latent counts once), per-layer L0 for per-layer coders."""

    l0: float
    l0_per_layer: np.ndarray | None  # [L]; sums to l0
    fire_count: np.ndarray  # [m] tokens on which each latent was active
    frequency: np.ndarray  # [m]
    n_dead: int
    n_dense: int
    dead_fraction: float
    dense_fraction: float
    n_tokens: int

    @property
    def alive(self) -> np.ndarray:
        return self.fire_count > 0


class SparsityAccumulator:
    """Counts active latents per token and per latent; dense means active on > threshold."""

    def __init__(
        self,
        n_latents: int,
        latent_layer: Tensor | None = None,
        n_layers: int | None = None,
        dense_threshold: float = DENSE_THRESHOLD,
    ) -> None:
        self.fire = torch.zeros(n_latents, dtype=torch.int64)
        self.latent_layer = None if latent_layer is None else latent_layer.long().cpu()
        if self.latent_layer is not None and n_layers is None:
            n_layers = int(self.latent_layer.max()) + 1
        self.n_layers = n_layers
        self.dense_threshold = dense_threshold
        self.active_total = 0
        self.n = 0

    def update(self, f: Tensor, keep: Tensor | None = None) -> None:
        active = _kept(f, keep).detach().cpu() > 0
        self.fire += active.sum(0)
        self.active_total += int(active.sum())
        self.n += active.shape[0]

    def result(self) -> SparsityResult:
        if self.n == 0:
            raise ValueError("SparsityAccumulator.result: no tokens were accumulated")
        fire = self.fire.numpy()
        per_layer = None
        if self.latent_layer is not None:
            per_layer = np.zeros(self.n_layers, dtype=np.float64)
            np.add.at(per_layer, self.latent_layer.numpy(), fire)
            per_layer /= self.n
        freq = fire / self.n
        n_dead = int((fire == 0).sum())
        n_dense = int((freq > self.dense_threshold).sum())
        m = fire.size
        return SparsityResult(
            l0=self.active_total / self.n,
            l0_per_layer=per_layer,
            fire_count=fire,
            frequency=freq,
            n_dead=n_dead,
            n_dense=n_dense,
            dead_fraction=n_dead / m,
            dense_fraction=n_dense / m,
            n_tokens=self.n,
        )


@torch.no_grad()
def evaluate_reconstruction(
    coder: Coder,
    batches: Iterable[Tensor],
    scale: Tensor,
    dense_threshold: float = DENSE_THRESHOLD,
) -> tuple[ReconstructionResult, SparsityResult]:
    """One pass: encode, decode and accumulate both metric families (special tokens removed)."""
    recon = ReconstructionAccumulator(scale)
    sparsity = SparsityAccumulator(
        coder.n_latents, coder.latent_layer(), coder.n_layers, dense_threshold
    )
    for x in batches:
        f = coder.encode(x)
        recon.update(x, coder.decode(f))
        sparsity.update(f)
    return recon.result(), sparsity.result()
