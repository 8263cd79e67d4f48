"""The standard acausal crosscoder: one dictionary reading and writing every layer.

``pre = sum_l x_l W_enc[l] + b_enc`` with dense ``W_enc[L, d, m]``, ``W_dec[m, L, d]``.
``CrossLayerCoder`` is also the body of the fmxcoder, which only swaps the weight
parameterisations and adds layer masking.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from pipeline.coders.base import CoderConfigBase, SparseCoder
from pipeline.coders.factorized import (
    Factorization,
    LayerWeight,
    WeightView,
    build_weight,
    init_tied_,
)


class CrosscoderConfig(CoderConfigBase):
    """A dense acausal crosscoder."""

    kind: Literal["crosscoder"] = Field("crosscoder", description="Architecture discriminator.")
    n_latents: int = Field(ge=1, description="Dictionary size (latents shared by all layers).")

    @property
    def group_size(self) -> int:
        return self.n_latents


class CrossLayerCoder(SparseCoder):
    """A cross-layer coder whose encoder and decoder are ``LayerWeight`` modules."""

    def __init__(
        self,
        config: CoderConfigBase,
        encoder_factorization: Factorization,
        decoder_factorization: Factorization,
        rank: int | None,
    ) -> None:
        super().__init__(config)
        dims = (self.n_latents, self.n_layers, self.d_model)
        self.encoder: LayerWeight = build_weight(encoder_factorization, *dims, "encoder", rank)
        self.decoder: LayerWeight = build_weight(decoder_factorization, *dims, "decoder", rank)
        generator = torch.Generator().manual_seed(config.seed)
        init_tied_(self.encoder, self.decoder, config.init_decoder_norm, generator)

    def encoder_view(self) -> WeightView:
        return self.encoder.view()

    def decoder_view(self) -> WeightView:
        return self.decoder.view()


class Crosscoder(CrossLayerCoder):
    """Dense weights, no masking: the baseline the fmxcoder is compared against."""

    config: CrosscoderConfig

    def __init__(self, config: CrosscoderConfig) -> None:
        super().__init__(config, "dense", "dense", None)
