"""Layer spectrum of a cache: the best FVU a decoder confined to a fixed subspace can reach.

``evaluate``'s FVU is the mean over layers of ``||x_l - x_hat_l||^2 / ||x_l - mean_l||^2``.
That mean does not change when a layer is rescaled, so it equals a plain squared error on
activations standardised per layer (centred, each layer's total variance set to 1). Then:

- ``shared_basis`` rank ``R`` puts every reconstruction's layer axis in the span of ``G``
  (``[L, R]``; a decoder bias absorbs the mean): the best it can do is PCA along layers,
  ``floor(R) = 1 - (sum of the top R eigenvalues of the L x L layer correlation) / L``.
  The floor is exact for a decoder with enough latents, 0 at ``R = L``, non-increasing.
- ``cp`` rank ``R`` puts reconstructions in the span of ``R`` atoms in ``R^(L*d)``: its
  floor is at least ``1 - (top R eigenvalues of the per-layer standardised [L*d, L*d]
  covariance) / L`` (a lower bound: the atoms are also rank 1 in ``L x d``). Computed on a
  token sample, whose own covariance it fits best, so a rank close to the sample size
  reads optimistic.

All moments are accumulated in float64 around a shift (the first batch's mean), so large
activation means (massive activations, uncentred units) do not cancel catastrophically.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from pipeline.store.outliers import DEFAULT_RATIO, excluded_rows, outlier_scan
from pipeline.store.reader import ActivationStore
from pipeline.training.loader import Normaliser, split_rows

# The train warning's sample (tokens): enough for an L x L Gram to settle to ~1e-3.
WARN_SAMPLE_TOKENS = 65_536
# The cp floor's sample and its largest L*d: an [L*d, L*d] float64 covariance and its
# eigenvalues (8192^2 doubles = 0.5 GB, about a minute on 2 cores).
CP_SAMPLE_TOKENS = 16_384
CP_MAX_DIM = 8192
# A decoder whose floor FVU is above this gets a warning from ``pipeline train``.
FLOOR_WARN_FVU = 0.05


@dataclass(frozen=True)
class SpectrumRow:
    rank: int
    share: float  # the rank-th eigenvalue's share of the total (sum over layers = L)
    floor_fvu: float  # best mean-over-layers FVU of a rank-`rank` shared layer basis


FloorKind = Literal["shared_basis", "cp"]


@dataclass(frozen=True)
class DecoderFloor:
    """A decoder that confines reconstructions to a fixed subspace: which kind, what rank."""

    kind: FloorKind
    rank: int


def decoder_floor(config: Any) -> DecoderFloor | None:
    """The floor a coder config's decoder has, or None (dense, per_latent, per-layer SAE,
    and ``shared_basis`` at full rank ``R = L``)."""
    kind = getattr(config, "decoder_factorization", "dense")
    rank = getattr(config, "rank", None)
    if kind == "shared_basis" and rank is not None and rank < config.n_layers:
        return DecoderFloor("shared_basis", rank)
    if kind == "cp" and rank is not None and rank < config.n_layers * config.d_model:
        return DecoderFloor("cp", rank)
    return None


class MomentAccumulator:
    """Shifted float64 sums of ``x [B, L, d]`` giving a centred covariance: ``layer`` (the
    ``[L, L]`` Gram summed over d) or ``flat`` (``[L*d, L*d]``)."""

    def __init__(self, flat: bool = False) -> None:
        self.flat = flat
        self.n = 0
        self.shift: Tensor | None = None
        self.sum: Tensor | None = None
        self.prod: Tensor | None = None

    def update(self, x: Tensor) -> None:
        if x.shape[0] == 0:
            return
        x = x.detach().cpu().double()
        if self.shift is None:
            self.shift = x.mean(0)
            self.sum = torch.zeros_like(self.shift)
            dim = x.shape[1] * x.shape[2] if self.flat else x.shape[1]
            self.prod = torch.zeros(dim, dim, dtype=torch.float64)
        c = x - self.shift
        self.sum += c.sum(0)
        if self.flat:
            # float32 products per batch (2-4x faster at L*d in the thousands), summed in
            # float64; the shift keeps them centred, so no cancellation is left to amplify
            flat = c.reshape(c.shape[0], -1).float()
            self.prod += (flat.T @ flat).double()
        else:
            self.prod += torch.einsum("bld,bmd->lm", c, c)
        self.n += x.shape[0]

    def covariance(self) -> Tensor:
        """Centred second moments (sums, not means) around the tokens' own mean."""
        if self.n == 0 or self.sum is None or self.prod is None:
            raise ValueError("spectrum: no tokens were accumulated")
        if self.flat:
            s = self.sum.reshape(-1)
            return self.prod - torch.outer(s, s) / self.n
        return self.prod - self.sum @ self.sum.T / self.n

    def standardised_eigenvalues(self) -> Tensor:
        """Eigenvalues (descending) of the covariance with each layer's total variance set to
        1; they sum to L."""
        cov = self.covariance()
        n_layers = self.shift.shape[0]
        if self.flat:
            d = self.shift.shape[1]
            var = cov.diagonal().view(n_layers, d).sum(1)
            inv = var.clamp_min(1e-30).rsqrt().repeat_interleave(d)
        else:
            inv = cov.diagonal().clamp_min(1e-30).rsqrt()
        corr = cov * torch.outer(inv, inv)
        return torch.linalg.eigvalsh(corr).flip(0).clamp_min(0.0)


def floor_curve(eigenvalues: Tensor, n_layers: int, max_rank: int | None = None) -> np.ndarray:
    """``floor[R-1]`` = best FVU of an R-dim subspace, R = 1..max_rank, from standardised
    eigenvalues (descending, summing to ``n_layers``); clipped to [0, 1]."""
    ev = eigenvalues.double()
    max_rank = len(ev) if max_rank is None else min(max_rank, len(ev))
    floor = 1.0 - ev[:max_rank].cumsum(0) / n_layers
    return floor.clamp(0.0, 1.0).numpy()


def layer_spectrum(acc: MomentAccumulator) -> list[SpectrumRow]:
    """The shared-layer-basis table, R = 1..L, from a ``layer`` accumulator."""
    ev = acc.standardised_eigenvalues()
    n_layers = len(ev)
    floor = floor_curve(ev, n_layers)
    floor[-1] = 0.0  # R = L spans every layer profile: exactly 0, not rounding noise
    return [SpectrumRow(r + 1, float(ev[r] / n_layers), float(floor[r])) for r in range(n_layers)]


def floor_fvu(acc: MomentAccumulator, floor: DecoderFloor) -> float:
    """The floor FVU of ``floor`` from an accumulator of the matching kind (``flat`` for cp)."""
    ev = acc.standardised_eigenvalues()
    n_layers = acc.shift.shape[0]
    if floor.rank >= len(ev):
        return 0.0
    return float(floor_curve(ev, n_layers, floor.rank)[floor.rank - 1])


def accumulator_for(floor: DecoderFloor, n_layers: int, d_model: int) -> MomentAccumulator | None:
    """The accumulator that ``floor_fvu`` needs, or None when a cp covariance would be too
    big (``L * d > CP_MAX_DIM``)."""
    if floor.kind == "cp":
        return None if n_layers * d_model > CP_MAX_DIM else MomentAccumulator(flat=True)
    return MomentAccumulator()


def training_batches(
    store: ActivationStore,
    layers: list[int],
    centre: bool,
    max_tokens: int | None = None,
    split: str = "train",
    outlier_ratio: float | None = DEFAULT_RATIO,
) -> Iterator[Tensor]:
    """The split's tokens, one store chunk at a time, normalised as the trainer sees them.

    All chunks in store order; with ``max_tokens``, chunks in a fixed random order (seed 0)
    until that many tokens, so a sample spans the store rather than its first documents.
    """
    outliers = outlier_scan(store, outlier_ratio)
    normaliser = Normaliser.from_store(store, layers, centre, outliers)
    rows = split_rows(store, split, exclude=excluded_rows(outliers))
    if rows.size == 0:
        raise ValueError(f"spectrum: the {split} split of cache {store.key} has no tokens")
    order = np.arange(store.n_chunks)
    if max_tokens is not None:
        order = torch.randperm(store.n_chunks, generator=torch.Generator().manual_seed(0))
        order = order.numpy()
    left = max_tokens
    for chunk in order:
        start, stop = store.chunk_rows(int(chunk))
        lo, hi = np.searchsorted(rows, [start, stop])
        if hi == lo:
            continue
        picked = rows[lo:hi] - start
        if left is not None:
            picked = picked[:left]
        raw = store.read(start, stop, layers)[torch.from_numpy(picked)]
        yield normaliser.apply(raw)
        if left is not None:
            left -= picked.size
            if left <= 0:
                return


def store_layers(store: ActivationStore, layers: str | list[int] | tuple[int, ...]) -> list[int]:
    """``all`` or explicit hook indices, checked against the store."""
    if layers == "all":
        return list(range(store.n_layers))
    chosen = list(layers)
    bad = [layer for layer in chosen if not 0 <= layer < store.n_layers]
    if bad or not chosen:
        raise ValueError(f"layers: {bad or chosen} out of range: the cache has {store.n_layers}")
    return chosen


def store_spectrum(
    store: ActivationStore,
    layers: list[int],
    centre: bool,
    max_tokens: int | None = None,
    outlier_ratio: float | None = DEFAULT_RATIO,
) -> tuple[list[SpectrumRow], int]:
    """The shared-layer-basis table of the training split, and the tokens it read."""
    acc = MomentAccumulator()
    for x in training_batches(store, layers, centre, max_tokens, outlier_ratio=outlier_ratio):
        acc.update(x)
    return layer_spectrum(acc), acc.n


def store_cp_floors(
    store: ActivationStore,
    layers: list[int],
    centre: bool,
    ranks: list[int],
    max_tokens: int = CP_SAMPLE_TOKENS,
    outlier_ratio: float | None = DEFAULT_RATIO,
) -> tuple[dict[int, float], int]:
    """cp floor FVU at each rank, from one training-split sample; and the tokens read."""
    acc = accumulator_for(DecoderFloor("cp", 1), len(layers), store.d_model)
    if acc is None:
        raise ValueError(
            f"cp floor: L*d = {len(layers) * store.d_model} is above CP_MAX_DIM = {CP_MAX_DIM}"
        )
    for x in training_batches(store, layers, centre, max_tokens, outlier_ratio=outlier_ratio):
        acc.update(x)
    ev = acc.standardised_eigenvalues()
    curve = floor_curve(ev, len(layers))
    return {r: float(curve[r - 1]) if r <= len(curve) else 0.0 for r in ranks}, acc.n


def sample_floor_curve(
    store: ActivationStore,
    layers: list[int],
    centre: bool,
    kind: FloorKind,
    outlier_ratio: float | None = DEFAULT_RATIO,
) -> list[float] | None:
    """Floor FVU at every rank (``[R-1]``) of a ``shared_basis`` or ``cp`` decoder, on the
    default training-split sample (None: cp too big to measure); 6 decimals."""
    acc = accumulator_for(DecoderFloor(kind, 1), len(layers), store.d_model)
    if acc is None:
        return None
    max_tokens = CP_SAMPLE_TOKENS if kind == "cp" else WARN_SAMPLE_TOKENS
    for x in training_batches(store, layers, centre, max_tokens, outlier_ratio=outlier_ratio):
        acc.update(x)
    curve = floor_curve(acc.standardised_eigenvalues(), len(layers))
    if kind == "shared_basis":
        curve[-1] = 0.0
    return [round(float(v), 6) for v in curve]


def cached_floor_fvu(
    store: ActivationStore,
    layers: list[int],
    centre: bool,
    floor: DecoderFloor,
    outlier_ratio: float | None = DEFAULT_RATIO,
) -> float | None:
    """A decoder's floor FVU from ``sample_floor_curve``, measured once per store, layers,
    centring and kind, and cached as JSON under the data dir (never in the store): every
    rank of that kind is then a lookup."""
    from pipeline.paths import spectrum_cache_file

    path = spectrum_cache_file(store.key, layers, centre, outlier_ratio)
    cached: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    if floor.kind not in cached:
        cached[floor.kind] = sample_floor_curve(store, layers, centre, floor.kind, outlier_ratio)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cached, sort_keys=True))
        tmp.replace(path)
    curve = cached[floor.kind]
    if curve is None:
        return None
    return float(curve[floor.rank - 1]) if floor.rank <= len(curve) else 0.0


def train_warning(
    name: str,
    config: Any,
    store: ActivationStore,
    layers: list[int],
    centre: bool,
    outlier_ratio: float | None = DEFAULT_RATIO,
) -> str | None:
    """``pipeline train``'s one line for a variant whose decoder floor is above
    ``FLOOR_WARN_FVU`` on this cache (measured once per cache, then read from the cache
    file), or None."""
    floor = decoder_floor(config)
    if floor is None:
        return None
    fvu = cached_floor_fvu(store, layers, centre, floor, outlier_ratio)
    return floor_warning(name, floor, fvu, store.key)


def floor_warning(name: str, floor: DecoderFloor, fvu: float | None, key: str) -> str | None:
    """The one-line train warning for a decoder floor above ``FLOOR_WARN_FVU``."""
    if fvu is None or fvu <= FLOOR_WARN_FVU:
        return None
    return (
        f"warning: {name}: decoder {floor.kind} rank {floor.rank} confines reconstructions "
        f"to a subspace with floor FVU {fvu:.3f} on this cache (pipeline spectrum {key})"
    )
