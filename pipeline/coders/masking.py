"""Stochastic layer masking and its collapse penalty (METHOD.md, "our definition").

Per token, with probability ``p``, one layer chosen uniformly is replaced by zero in the
encoder input (inputs are centred, so zero is that layer's mean); optionally the other
layers are rescaled by ``L / (L - 1)`` (inverted dropout). The coder still reconstructs
the clean activations of every layer, so a latent cannot rely on one layer alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class MaskedBatch:
    """The encoder input and which layer each token lost (``-1``: not masked)."""

    x: Tensor  # [batch, n_layers, d_model]
    masked_layer: Tensor  # [batch] long

    @property
    def token_mask(self) -> Tensor:
        """``[batch]`` bool: tokens that had a layer masked."""
        return self.masked_layer >= 0


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """A generator determined by ``(seed, step)`` alone, so a resumed run masks identically
    without storing generator state."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) % (2**63 - 1))
    return g


def sample_masked_layers(
    batch: int, n_layers: int, probability: float, generator: torch.Generator
) -> Tensor:
    """``[batch]`` long on the generator's device: the masked layer per token, or ``-1``."""
    dev = generator.device
    masked = torch.rand(batch, generator=generator, device=dev) < probability
    layer = torch.randint(0, n_layers, (batch,), generator=generator, device=dev)
    return torch.where(masked, layer, torch.full_like(layer, -1))


def mask_layers(
    x: Tensor, probability: float, rescale: bool, generator: torch.Generator
) -> MaskedBatch:
    """Mask one uniformly chosen layer of each token with probability ``probability``.

    Masked layers become exactly zero; with ``rescale`` the remaining layers of a masked
    token are multiplied by ``L / (L - 1)``; unmasked tokens are returned unchanged.
    """
    batch, n_layers, _ = x.shape
    if n_layers < 2:
        raise ValueError("layer masking needs at least 2 layers")
    masked_layer = sample_masked_layers(batch, n_layers, probability, generator).to(x.device)
    layers = torch.arange(n_layers, device=x.device)
    drop = masked_layer[:, None] == layers[None, :]  # [B, L]
    scale = torch.ones(batch, n_layers, device=x.device, dtype=x.dtype)
    if rescale:
        token = (masked_layer >= 0)[:, None].expand(-1, n_layers)
        scale = torch.where(token, torch.full_like(scale, n_layers / (n_layers - 1)), scale)
    scale = scale.masked_fill(drop, 0.0)
    return MaskedBatch(x=x * scale[:, :, None], masked_layer=masked_layer)


def collapse_penalty(
    codes_clean: Tensor, codes_masked: Tensor, decoder_row_norms: Tensor, token_mask: Tensor
) -> Tensor:
    """``sum_i ||d_i|| * relu(sg[f_i(x)] - f_i(x_masked))`` over latents active on the clean
    input, mean over the batch.

    Only masked tokens count: on the others the two inputs are identical, and a difference
    could only come from batch-level selection (BatchTopK), not from the masked layer.
    """
    clean = codes_clean.detach()
    active = (clean > 0) & token_mask[:, None]
    drop = (clean - codes_masked).relu() * active
    return (drop * decoder_row_norms).sum(-1).mean()
