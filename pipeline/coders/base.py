"""The interface every coder implements, so training and evaluation never branch on architecture.

Shapes: ``x`` is a batch of normalised activations ``[batch, n_layers, d_model]``; ``f`` is
the latent code ``[batch, n_latents]``. Per-layer SAEs flatten their ``n_layers`` dictionaries
into one latent axis, latent ``i`` belonging to layer ``latent_layer()[i]``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class LossOutput:
    """A training loss and its named terms (detached floats) for logging."""

    loss: Tensor
    terms: dict[str, float] = field(default_factory=dict)
    codes: Tensor | None = None  # f on the (possibly masked) input, for L0 / dead-latent tracking


class Coder(nn.Module, ABC):
    """A sparse dictionary over the residual streams of ``n_layers`` layers."""

    n_layers: int
    d_model: int
    n_latents: int

    @abstractmethod
    def encode_pre(self, x: Tensor) -> Tensor:
        """Pre-activations ``[batch, n_latents]``."""

    @abstractmethod
    def activate(self, pre: Tensor) -> Tensor:
        """The activation function (inference form: BatchTopK uses its tracked threshold)."""

    def encode(self, x: Tensor) -> Tensor:
        return self.activate(self.encode_pre(x))

    @abstractmethod
    def decode(self, f: Tensor) -> Tensor:
        """Reconstruction ``[batch, n_layers, d_model]``."""

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    @abstractmethod
    def training_loss(self, x: Tensor, step: int, total_steps: int) -> LossOutput:
        """Reconstruction + sparsity (+ auxiliary, + masking) loss on one batch."""

    @abstractmethod
    def layer_contributions(self, x: Tensor, latents: Tensor) -> Tensor:
        """``c[b, l, k] = <x[b, l], W_enc[l, :, latents[k]]>``: the encoder is additive over
        layers, so this splits each selected latent's pre-activation (less its bias) by layer.
        Returns ``[batch, n_layers, len(latents)]``; factorised weights are expanded."""

    @abstractmethod
    def decoder_norms(self) -> Tensor:
        """``||W_dec[i, l]||`` as ``[n_latents, n_layers]`` (normalised units)."""

    def latent_layer(self) -> Tensor | None:
        """For coders whose latents each own one layer (per-layer SAEs), that layer; else None."""
        return None

    @torch.no_grad()
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
