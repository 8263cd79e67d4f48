"""The fmxcoder: a crosscoder with layer-factorised weights and stochastic layer masking.

Factorisation (``encoder_factorization`` / ``decoder_factorization``, rank ``R``) and masking
(``masking_probability``) are independent switches, so each can be ablated alone: dense
weights with masking, or factorised weights without it, are both valid configurations.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from pipeline.coders.base import CoderConfigBase
from pipeline.coders.crosscoder import CrossLayerCoder
from pipeline.coders.factorized import Factorization
from pipeline.coders.masking import collapse_penalty, mask_layers, step_generator


class FmxcoderConfig(CoderConfigBase):
    """A factorised, layer-masked crosscoder."""

    kind: Literal["fmxcoder"] = Field("fmxcoder", description="Architecture discriminator.")
    n_latents: int = Field(ge=1, description="Dictionary size (latents shared by all layers).")
    encoder_factorization: Factorization = Field(
        "shared_basis",
        description="dense W[L,d,m]; shared_basis: W[i,l] = sum_r G[l,r] V[i,r] with G shared "
        "by all latents; per_latent: W[i,l] = sum_r A[i,l,r] B[i,r]; cp: W[i,l,:] = "
        "sum_r A[i,r] B[l,r] C[r,:] with atoms shared by all latents (rank may exceed n_layers).",
    )
    decoder_factorization: Factorization = Field(
        "shared_basis", description="As encoder_factorization, for the decoder."
    )
    rank: int | None = Field(
        None,
        ge=1,
        description="Rank R of the factorised weights: <= n_layers for shared_basis and "
        "per_latent; any size for cp (its number of shared atoms).",
    )
    masking_probability: float = Field(
        0.0, ge=0, le=1, description="Per-token probability of masking one layer (0 disables)."
    )
    masking_rescale: bool = Field(
        True, description="Rescale the unmasked layers of a masked token by L/(L-1)."
    )
    collapse_coefficient: float = Field(
        0.0,
        ge=0,
        description="Weight of the collapse penalty sum_i ||d_i|| relu(sg[f_i(x)] - "
        "f_i(x_masked)) (0 disables; needs masking).",
    )

    @property
    def group_size(self) -> int:
        return self.n_latents

    @property
    def factorized(self) -> bool:
        return (self.encoder_factorization, self.decoder_factorization) != ("dense", "dense")

    @model_validator(mode="after")
    def _check_fmx_fields(self) -> FmxcoderConfig:
        if self.factorized and self.rank is None:
            raise ValueError(
                "rank is required when encoder_factorization or "
                "decoder_factorization is not 'dense'"
            )
        if not self.factorized and self.rank is not None:
            raise ValueError(
                "rank is only used when encoder_factorization or "
                "decoder_factorization is not 'dense'; leave it unset"
            )
        layer_ranked = {"shared_basis", "per_latent"} & {
            self.encoder_factorization,
            self.decoder_factorization,
        }
        if layer_ranked and self.rank is not None and self.rank > self.n_layers:
            raise ValueError(
                f"rank (={self.rank}) must be <= n_layers (={self.n_layers}) for "
                f"{' and '.join(sorted(layer_ranked))}"
            )
        if self.masking_probability > 0 and self.n_layers < 2:
            raise ValueError("masking_probability > 0 needs n_layers >= 2")
        if self.collapse_coefficient > 0 and self.masking_probability == 0:
            raise ValueError("collapse_coefficient > 0 needs masking_probability > 0")
        return self


class Fmxcoder(CrossLayerCoder):
    """Factorised encoder/decoder plus masking; reconstructs the clean targets of every layer."""

    config: FmxcoderConfig

    def __init__(self, config: FmxcoderConfig) -> None:
        super().__init__(
            config, config.encoder_factorization, config.decoder_factorization, config.rank
        )

    def _training_input(
        self, x: Tensor, step: int, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor | None]:
        c = self.config
        if c.masking_probability == 0:
            return x, None
        gen = generator if generator is not None else step_generator(c.seed, step, x.device)
        masked = mask_layers(x, c.masking_probability, c.masking_rescale, gen)
        return masked.x, masked.token_mask

    def _extra_losses(
        self, ctx: dict[str, Any], step: int, total_steps: int
    ) -> dict[str, tuple[float, Tensor]]:
        c = self.config
        if c.collapse_coefficient == 0 or ctx["token_mask"] is None:
            return {}
        with torch.no_grad():
            codes_clean = self.activation(ctx["enc"].encode(ctx["x"]) + self.b_enc)
        row_norms = ctx["dec"].layer_norms().pow(2).sum(1).sqrt()  # ||d_i|| over all layers
        term = collapse_penalty(codes_clean, ctx["codes"], row_norms, ctx["token_mask"])
        return {"collapse": (c.collapse_coefficient, term)}
