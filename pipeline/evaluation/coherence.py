"""Functional coherence: how many layers a latent reads from, against how many it writes to.

The encoder is additive over layers, so each active latent's pre-activation splits into
per-layer contributions ``c_l = <x_l - mu_l, W_enc[l, :, i]>``; ``N_eff = 1 / sum p_l^2`` with
``p = c^+ / sum c^+`` counts the layers that carry it (1..L). Positive contributions alone
hide cancellation (a layer pushing +5 and another -4 reads as one layer), so two
companions are kept beside it: the absolute N_eff (``p = |c| / sum |c|``) and the ablation
N_eff (``p_l`` proportional to ``relu(f(x) - f(x with layer l at its mean))``: how much of the
activation each layer's removal takes away, nonlinearity included). A decoder can look
spread (``D_eff`` near L) while the function is local (``FC`` near 1): the abstract's
claim, so both are reported, plus a masking test that sets one layer to its mean.
Everything streams; contributions are computed for blocks of latents on the tokens where
the block is active, never as ``[tokens, L, m]``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pipeline.coders.base import Coder

BLOCK_ELEMENTS = 1 << 24  # 64 MB of float32 contributions per block


def normalised_mean(mean: Tensor, scale: Tensor, centred: bool) -> Tensor:
    """The harvest mean in the units coders see: zero once centred, else ``mean * scale``."""
    if centred:
        return torch.zeros_like(mean, dtype=torch.float32)
    return (mean * scale.view(-1, 1)).float()


def effective_layers(c: Tensor, dim: int = -2, absolute: bool = False) -> Tensor:
    """``(sum c^+)^2 / sum (c^+)^2`` along ``dim`` (``|c|`` when ``absolute``); NaN where
    every contribution is zero (or, not absolute, none is positive)."""
    pos = c.abs() if absolute else c.clamp_min(0)
    total, energy = pos.sum(dim), pos.pow(2).sum(dim)
    return torch.where(energy > 0, total.pow(2) / energy.clamp_min(1e-30), torch.nan)


def decoder_spread(coder: Coder, scale: Tensor) -> np.ndarray:
    """``D_eff = (sum n_l)^2 / sum n_l^2`` with raw-unit decoder norms ``n_l``; ``[m]``."""
    with torch.no_grad():
        norms = coder.decoder_norms().detach().cpu().double() / scale.double().cpu().view(1, -1)
    return effective_layers(norms, dim=-1).numpy()


@dataclass(frozen=True)
class CoherenceResult:
    """Per-latent FC (NaN where never active with a positive contribution) and its mean."""

    fc: np.ndarray  # [m]
    weight: np.ndarray  # [m] summed activations behind each FC
    fc_mean: float  # over alive latents with a defined FC
    n_alive: int
    undefined_tokens: int  # active (latent, token) pairs whose contributions were all <= 0
    n_layers: int
    fc_abs: np.ndarray  # [m] the same with |c|: cancellations count as layers read
    fc_abs_mean: float

    def histogram(self, bins: int = 20) -> tuple[np.ndarray, np.ndarray]:
        """Counts and edges over ``[1, L]`` for the alive latents."""
        values = self.fc[np.isfinite(self.fc)]
        return np.histogram(values, bins=bins, range=(1.0, float(self.n_layers)))


class CoherenceAccumulator:
    """Activation-weighted sums of ``N_eff`` per latent, one batch at a time."""

    def __init__(
        self,
        coder: Coder,
        mu: Tensor | None = None,
        block_elements: int = BLOCK_ELEMENTS,
        n_docs: int = 0,
    ) -> None:
        self.coder = coder
        self.mu = None if mu is None else mu.float()
        self.block_elements = block_elements
        self.num = torch.zeros(coder.n_latents, dtype=torch.float64)
        self.den = torch.zeros(coder.n_latents, dtype=torch.float64)
        self.num_abs = torch.zeros(coder.n_latents, dtype=torch.float64)
        self.den_abs = torch.zeros(coder.n_latents, dtype=torch.float64)
        self.fired = torch.zeros(coder.n_latents, dtype=torch.bool)
        self.undefined = 0
        # per document (pipeline.evaluation.bootstrap), when n_docs > 0: [docs, m]
        self.doc_num = torch.zeros(n_docs, coder.n_latents, dtype=torch.float64)
        self.doc_den = torch.zeros(n_docs, coder.n_latents, dtype=torch.float64)

    @torch.no_grad()
    def update(self, x: Tensor, f: Tensor | None = None, slots: Tensor | None = None) -> None:
        """``slots``: each token's document slot, to keep per-document sums too."""
        f = self.coder.encode(x) if f is None else f
        active = f > 0
        self.fired |= active.any(0).cpu()
        xc = x if self.mu is None else x - self.mu.to(x.device)
        cols = active.any(0).nonzero().squeeze(1)
        block = max(1, self.block_elements // max(1, x.shape[0] * self.coder.n_layers))
        for start in range(0, cols.numel(), block):
            latents = cols[start : start + block]
            sub = active[:, latents]
            rows = sub.any(1).nonzero().squeeze(1)
            if rows.numel() < x.shape[0] // 2:  # gather only when it saves real work
                sub, x_rows = sub[rows], xc[rows]
            else:
                rows, x_rows = torch.arange(x.shape[0], device=x.device), xc
            c = self.coder.layer_contributions(x_rows, latents)  # [r, L, k]
            neff = effective_layers(c)
            ok = sub & torch.isfinite(neff)
            w = torch.where(ok, f[rows.unsqueeze(1), latents], 0).double()
            self.num[latents.cpu()] += (w * torch.nan_to_num(neff).double()).sum(0).cpu()
            self.den[latents.cpu()] += w.sum(0).cpu()
            if slots is not None:
                self._per_document(slots[rows.cpu()], latents.cpu(), w * torch.nan_to_num(neff), w)
            self.undefined += int((sub & ~ok).sum())
            neff_abs = effective_layers(c, absolute=True)
            ok_abs = sub & torch.isfinite(neff_abs)
            w_abs = torch.where(ok_abs, f[rows.unsqueeze(1), latents], 0).double()
            self.num_abs[latents.cpu()] += (
                (w_abs * torch.nan_to_num(neff_abs).double()).sum(0).cpu()
            )
            self.den_abs[latents.cpu()] += w_abs.sum(0).cpu()

    def _per_document(self, docs: Tensor, latents: Tensor, num: Tensor, den: Tensor) -> None:
        for total, part in ((self.doc_num, num), (self.doc_den, den)):
            block = torch.zeros(total.shape[0], latents.numel(), dtype=torch.float64)
            total[:, latents] += block.index_add_(0, docs, part.double().cpu())

    def per_document(self) -> tuple[Tensor, Tensor]:
        """``(num, den)`` per document and latent: ``fc = sum num / sum den``."""
        return self.doc_num, self.doc_den

    def result(self) -> CoherenceResult:
        fc, fc_mean = weighted_mean(self.num, self.den)
        fc_abs, fc_abs_mean = weighted_mean(self.num_abs, self.den_abs)
        return CoherenceResult(
            fc=fc,
            weight=self.den.numpy(),
            fc_mean=fc_mean,
            n_alive=int(self.fired.sum()),
            undefined_tokens=self.undefined,
            n_layers=self.coder.n_layers,
            fc_abs=fc_abs,
            fc_abs_mean=fc_abs_mean,
        )


def weighted_mean(num: Tensor, den: Tensor) -> tuple[np.ndarray, float]:
    """Per-latent ``num / den`` (NaN where ``den`` is 0) and its mean over defined latents."""
    per_latent = torch.where(den > 0, num / den.clamp_min(1e-30), torch.nan).numpy()
    finite = per_latent[np.isfinite(per_latent)]
    return per_latent, float(finite.mean()) if finite.size else float("nan")


@dataclass(frozen=True)
class MaskingResult:
    """``ratio[l, i]``: latent i's mean activation with layer l masked over its clean mean."""

    ratio: np.ndarray  # [L, m]
    min_ratio: np.ndarray  # [m]
    worst_layer: np.ndarray  # [m], -1 for latents never active
    fragile: np.ndarray  # [m] bool: some single layer halves (or more) the activation
    share_fragile: float  # over alive latents
    n_alive: int
    fc_ablation: np.ndarray  # [m] activation-weighted ablation N_eff, NaN if never defined
    fc_ablation_mean: float  # over latents with a defined value


class MaskingAccumulator:
    """Zero one layer (its mean, in centred normalised units) and re-encode, for every layer."""

    def __init__(
        self,
        coder: Coder,
        mu: Tensor | None = None,
        threshold: float = 0.5,
        rescale: bool = False,
    ) -> None:
        self.coder, self.threshold, self.rescale = coder, threshold, rescale
        self.mu = None if mu is None else mu.float()
        self.clean = torch.zeros(coder.n_latents, dtype=torch.float64)
        self.masked = torch.zeros(coder.n_layers, coder.n_latents, dtype=torch.float64)
        self.ablation_num = torch.zeros(coder.n_latents, dtype=torch.float64)
        self.ablation_den = torch.zeros(coder.n_latents, dtype=torch.float64)

    def _mask(self, xc: Tensor, layer: int) -> Tensor:
        out = xc.clone()
        out[:, layer] = 0
        if self.rescale:  # inverted dropout, as in the training-time masking option
            out *= self.coder.n_layers / (self.coder.n_layers - 1)
        return out if self.mu is None else out + self.mu.to(out.device)

    @torch.no_grad()
    def update(self, x: Tensor, f: Tensor | None = None) -> None:
        """``f``: the codes of ``x`` when the caller has them already."""
        f = self.coder.encode(x) if f is None else f
        active = f > 0
        self.clean += torch.where(active, f, 0).double().sum(0).cpu()
        xc = x if self.mu is None else x - self.mu.to(x.device)
        drop_sum = torch.zeros_like(f, dtype=torch.float64)
        drop_sq = torch.zeros_like(f, dtype=torch.float64)
        for layer in range(self.coder.n_layers):
            g = self.coder.encode(self._mask(xc, layer))
            self.masked[layer] += torch.where(active, g, 0).double().sum(0).cpu()
            drop = torch.where(active, (f - g).clamp_min(0), 0).double()
            drop_sum += drop
            drop_sq += drop.square()
        # ablation N_eff per (token, latent): (sum Delta)^2 / sum Delta^2 over layers
        ok = active & (drop_sq > 0)
        neff = torch.where(ok, drop_sum.square() / drop_sq.clamp_min(1e-30), 0)
        w = torch.where(ok, f, 0).double()
        self.ablation_num += (w * neff).sum(0).cpu()
        self.ablation_den += w.sum(0).cpu()

    def result(self) -> MaskingResult:
        alive = self.clean > 0
        ratio = torch.where(alive, self.masked / self.clean.clamp_min(1e-30), torch.nan)
        min_ratio, worst = ratio.nan_to_num(torch.inf).min(0)
        min_ratio = torch.where(alive, min_ratio, torch.nan)
        fragile = alive & (min_ratio < self.threshold)
        n_alive = int(alive.sum())
        fc_ablation, fc_ablation_mean = weighted_mean(self.ablation_num, self.ablation_den)
        return MaskingResult(
            ratio=ratio.numpy(),
            min_ratio=min_ratio.numpy(),
            worst_layer=torch.where(alive, worst, -1).numpy(),
            fragile=fragile.numpy(),
            share_fragile=float(fragile.sum()) / n_alive if n_alive else float("nan"),
            n_alive=n_alive,
            fc_ablation=fc_ablation,
            fc_ablation_mean=fc_ablation_mean,
        )


def evaluate_coherence(
    coder: Coder,
    batches: Iterable[Tensor],
    mu: Tensor | None = None,
    masking: bool = True,
    masking_threshold: float = 0.5,
) -> tuple[CoherenceResult, MaskingResult | None]:
    """One pass for FC and (optionally: L + 1 encodes per batch) the masking test."""
    fc = CoherenceAccumulator(coder, mu)
    mask = MaskingAccumulator(coder, mu, masking_threshold) if masking else None
    for x in batches:
        fc.update(x)
        if mask is not None:
            mask.update(x)
    return fc.result(), None if mask is None else mask.result()
