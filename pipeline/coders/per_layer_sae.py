"""Per-layer SAEs, the baseline: ``n_layers`` independent dictionaries trained as one tensor.

Latent ``i = l * latents_per_layer + j`` is latent ``j`` of layer ``l``'s SAE: it reads and
writes layer ``l`` only. TopK/BatchTopK/AuxK act per layer (one activation group per layer),
so ``k`` is the number of active latents per layer.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from pipeline.coders.base import CoderConfigBase, SparseCoder
from pipeline.coders.factorized import WeightView


class PerLayerSAEConfig(CoderConfigBase):
    """``n_layers`` independent SAEs of ``latents_per_layer`` latents each."""

    kind: Literal["per_layer_sae"] = Field(
        "per_layer_sae", description="Architecture discriminator."
    )
    latents_per_layer: int = Field(ge=1, description="Dictionary size of each layer's SAE.")

    @property
    def n_groups(self) -> int:
        return self.n_layers

    @property
    def group_size(self) -> int:
        return self.latents_per_layer


class BlockView(WeightView):
    """A block-diagonal ``[L*m, L, d]`` weight stored as its ``[L, m, d]`` diagonal blocks."""

    def __init__(self, w: Tensor) -> None:
        self.w = w  # [L, m, d]

    def encode(self, x: Tensor) -> Tensor:
        return torch.einsum("bld,lmd->blm", x, self.w).reshape(x.shape[0], -1)

    def decode(self, f: Tensor) -> Tensor:
        n_layers, m, _ = self.w.shape
        return torch.einsum("blm,lmd->bld", f.view(f.shape[0], n_layers, m), self.w)

    def layer_norms(self) -> Tensor:
        n_layers, m, _ = self.w.shape
        own = self.w.norm(dim=-1)  # [L, m]
        eye = torch.eye(n_layers, device=own.device, dtype=own.dtype)
        return (own[:, :, None] * eye[:, None, :]).reshape(n_layers * m, n_layers)

    def expand_latents(self, latents: Tensor) -> Tensor:
        n_layers, m, d = self.w.shape
        layer, j = latents // m, latents % m
        out = self.w.new_zeros(len(latents), n_layers, d)
        out[torch.arange(len(latents), device=out.device), layer] = self.w[layer, j]
        return out

    def expand(self) -> Tensor:
        return self.expand_latents(
            torch.arange(self.w.shape[0] * self.w.shape[1], device=self.w.device)
        )


class PerLayerSAE(SparseCoder):
    """``W_enc[L, d, m]``, ``W_dec[L, m, d]``: one batched einsum per step for all layers."""

    config: PerLayerSAEConfig

    def __init__(self, config: PerLayerSAEConfig) -> None:
        super().__init__(config)
        n_layers, m, d = config.n_layers, config.latents_per_layer, config.d_model
        g = torch.Generator().manual_seed(config.seed)
        w = torch.randn(n_layers, m, d, generator=g)
        w = config.init_decoder_norm * w / w.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(w)
        self.W_enc = nn.Parameter(w.transpose(1, 2).clone())

    def encoder_view(self) -> WeightView:
        return BlockView(self.W_enc.transpose(1, 2))

    def decoder_view(self) -> WeightView:
        return BlockView(self.W_dec)

    def latent_layer(self) -> Tensor:
        m = self.config.latents_per_layer
        return torch.arange(self.n_latents, device=self.W_dec.device) // m
