"""The interface every coder implements, so training and evaluation never branch on architecture.

Shapes: ``x`` is a batch of normalised activations ``[batch, n_layers, d_model]``; ``f`` is
the latent code ``[batch, n_latents]``. Per-layer SAEs flatten their ``n_layers`` dictionaries
into one latent axis, latent ``i`` belonging to layer ``latent_layer()[i]``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from pipeline.coders.activations import ActivationKind, auxk_loss, build_activation, l1_penalty
from pipeline.coders.cost import MacsPerToken, macs_per_token
from pipeline.coders.factorized import WeightView
from pipeline.manifests.harvest import kind_problem

# Dead-latent window when a run does not set one: at most 10M tokens, at least one batch,
# else a tenth of the run, so AuxK acts in short runs too (resolve_dead_after_tokens).
DEAD_AFTER_TOKENS_CAP = 10_000_000


def resolve_dead_after_tokens(total_tokens: int, batch_size: int) -> int:
    """The dead-latent window of a run of ``total_tokens`` (config value None)."""
    return min(DEAD_AFTER_TOKENS_CAP, max(batch_size, total_tokens // 10))


def layer_fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Mean over layers of per-layer FVU on ``[batch, L, d]``: residual energy over the
    variance around each layer's batch mean (the definition ``evaluate`` reports)."""
    err = (x - x_hat).pow(2).sum((0, 2))
    var = (x - x.mean(0)).pow(2).sum((0, 2)).clamp_min(1e-12)
    return (err / var).mean()


@dataclass
class LossOutput:
    """A training loss and its named terms (detached 0-d tensors, still on the device: the
    trainer converts them to floats only on the steps it logs)."""

    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    codes: Tensor | None = None  # f on the (possibly masked) input, for L0 / dead-latent tracking

    def floats(self) -> dict[str, float]:
        return terms_to_floats(self.terms)


def terms_to_floats(terms: dict[str, Tensor | float]) -> dict[str, float]:
    """One device sync for all tensor terms (stacked where they live) instead of one
    ``.item()`` each; plain numbers pass through."""
    tensors = {k: t for k, t in terms.items() if isinstance(t, Tensor)}
    synced = {}
    if tensors:
        stacked = torch.stack([t.detach().double().reshape(()) for t in tensors.values()])
        synced = dict(zip(tensors, stacked.tolist(), strict=True))
    return {k: synced[k] if k in synced else float(v) for k, v in terms.items()}


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

    def encoder_weight(self) -> Tensor:
        """Dense ``W_enc`` as ``[n_layers, d_model, n_latents]`` (factorised weights expanded)."""
        raise NotImplementedError

    def decoder_weight(self) -> Tensor:
        """Dense ``W_dec`` as ``[n_latents, n_layers, d_model]`` (factorised weights expanded)."""
        raise NotImplementedError

    @torch.no_grad()
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# The activation-specific fields and the activations that read them: setting one of them to
# a non-default value while another activation is chosen is an error, not a silent no-op.
_ACTIVATION_FIELDS: dict[str, tuple[str, ...]] = {
    "k": ("topk", "batchtopk"),
    "l1_coefficient": ("relu",),
    "l0_coefficient": ("jumprelu",),
    "jumprelu_bandwidth": ("jumprelu",),
    "jumprelu_init_threshold": ("jumprelu",),
    "batchtopk_threshold_momentum": ("batchtopk",),
}


class CoderConfigBase(BaseModel):
    """Fields every coder shares; each architecture's config adds ``kind`` and its size.
    Strict like every manifest section: ``k: "6"`` is an error, not 6."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _strict_kinds(cls, data: Any) -> Any:
        # A model-level check: pydantic allows no field validator on the ``kind`` discriminator.
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name)
                if field is not None and (problem := kind_problem(field.annotation, value)):
                    raise ValueError(f"{name} {problem}")
        return data

    n_layers: int = Field(ge=1, description="Number of layers (residual streams) read.")
    d_model: int = Field(ge=1, description="Residual stream width.")
    activation: ActivationKind = Field(
        "topk",
        description="relu (+ L1 on f_i * sum_l ||W_dec[i,l]||), topk, batchtopk (tracked "
        "threshold at inference) or jumprelu (+ L0 with straight-through threshold).",
    )
    k: int | None = Field(
        None, ge=1, description="Active latents per token (per layer for per-layer SAEs)."
    )
    l1_coefficient: float = Field(1.0, ge=0, description="relu: L1 sparsity coefficient.")
    l0_coefficient: float = Field(1.0, ge=0, description="jumprelu: L0 sparsity coefficient.")
    jumprelu_bandwidth: float = Field(
        1e-3, gt=0, description="jumprelu: width of the rectangle pseudo-derivative kernel."
    )
    jumprelu_init_threshold: float = Field(
        1e-3, gt=0, description="jumprelu: initial threshold of every latent."
    )
    batchtopk_threshold_momentum: float = Field(
        0.99, ge=0, lt=1, description="batchtopk: EMA momentum of the inference threshold."
    )
    sparsity_warmup_fraction: float = Field(
        0.05,
        ge=0,
        le=1,
        description="The L1/L0 coefficient ramps linearly from 0 over this fraction of the "
        "total steps (0: no ramp).",
    )
    auxk_coefficient: float = Field(
        1 / 32, ge=0, description="Weight of the AuxK dead-latent loss (0 disables)."
    )
    auxk_k: int | None = Field(
        None,
        ge=1,
        description="Dead latents used by AuxK per group; None: d_model // 2, capped at the "
        "latents per group.",
    )
    dead_after_tokens: int | None = Field(
        None,
        ge=1,
        description="A latent is dead after this many tokens without firing; None: resolved "
        "at run start to min(10M, max(batch, run tokens // 10)) and recorded.",
    )
    init_decoder_norm: float = Field(
        0.1, gt=0, description="Initial norm of each latent's decoder row in each layer."
    )
    seed: int = Field(0, description="Seed for initialisation and layer masking.")

    @property
    def n_groups(self) -> int:
        """Activation groups: 1 for cross-layer coders, one per layer for per-layer SAEs."""
        return 1

    @property
    def group_size(self) -> int:
        """Latents per activation group (what ``k`` and ``auxk_k`` are bounded by)."""
        raise NotImplementedError

    @property
    def total_latents(self) -> int:
        return self.n_groups * self.group_size

    @property
    def resolved_auxk_k(self) -> int:
        return min(self.auxk_k or max(self.d_model // 2, 1), self.group_size)

    @model_validator(mode="after")
    def _check_activation_fields(self) -> CoderConfigBase:
        if self.activation in ("topk", "batchtopk"):
            if self.k is None:
                raise ValueError(f"k is required when activation is {self.activation!r}")
            if self.k > self.group_size:
                raise ValueError(
                    f"k (={self.k}) must be <= the latents per group ({self.group_size})"
                )
        for name, kinds in _ACTIVATION_FIELDS.items():
            default = type(self).model_fields[name].default
            if self.activation not in kinds and getattr(self, name) != default:
                raise ValueError(
                    f"{name} is only used with activation {' or '.join(kinds)}, "
                    f"not {self.activation!r}; leave it unset"
                )
        if self.auxk_k is not None and self.auxk_k > self.group_size:
            raise ValueError(
                f"auxk_k (={self.auxk_k}) must be <= the latents per group ({self.group_size})"
            )
        return self


class SparseCoder(Coder):
    """The training machinery every architecture shares, written once against ``WeightView``s.

    Loss = recon + lambda(step) * sparsity + auxk_coefficient * auxk (+ extra terms), where
    recon is the squared error summed over layers and d_model, averaged over the batch.
    """

    config: CoderConfigBase

    def __init__(self, config: CoderConfigBase) -> None:
        super().__init__()
        self.config = config
        self.n_layers, self.d_model = config.n_layers, config.d_model
        self.n_latents = config.total_latents
        self.activation = build_activation(
            config.activation,
            config.n_groups,
            config.group_size,
            k=config.k,
            batchtopk_momentum=config.batchtopk_threshold_momentum,
            jumprelu_init_threshold=config.jumprelu_init_threshold,
            jumprelu_bandwidth=config.jumprelu_bandwidth,
        )
        self.b_enc = nn.Parameter(torch.zeros(self.n_latents))
        self.b_dec = nn.Parameter(torch.zeros(self.n_layers, self.d_model))
        self.register_buffer("tokens_since_fired", torch.zeros(self.n_latents, dtype=torch.long))
        self._since_fired_bound: int | None = None  # host-side bound, see may_have_dead

    @abstractmethod
    def encoder_view(self) -> WeightView:
        """The encoder as a ``[n_latents, n_layers, d_model]`` view for this step."""

    @abstractmethod
    def decoder_view(self) -> WeightView:
        """The decoder as a ``[n_latents, n_layers, d_model]`` view for this step."""

    def encode_pre(self, x: Tensor) -> Tensor:
        return self.encoder_view().encode(x) + self.b_enc

    def activate(self, pre: Tensor) -> Tensor:
        return self.activation(pre)

    def decode(self, f: Tensor) -> Tensor:
        dec = self.decoder_view()
        if torch.is_grad_enabled() and f.requires_grad:
            return dec.decode(f) + self.b_dec  # callers may want dL/df everywhere
        return dec.decode_sparse(f) + self.b_dec  # exact when f needs no gradient

    # Activations whose backward reads dL/df only where f != 0, so that the sparse decode
    # (which gives f its gradient on its support alone) is exact for them. Not JumpReLU: its
    # threshold pseudo-derivative reads dL/df just below the threshold, where f == 0.
    _SUPPORT_GRADIENT_ACTIVATIONS = ("relu", "topk", "batchtopk")

    def _decode_codes(self, dec: WeightView, f: Tensor) -> Tensor:
        """Decode the activation's training codes (no bias): sparse when the activation allows
        it; TopK bounds the nonzeros per row (no host sync), the others are measured."""
        c = self.config
        if c.activation not in self._SUPPORT_GRADIENT_ACTIVATIONS:
            return dec.decode(f)
        bound = c.k * c.n_groups if c.activation == "topk" and c.k is not None else None
        return dec.decode_sparse(f, bound)

    def decoder_norms(self) -> Tensor:
        return self.decoder_view().layer_norms()

    def layer_contributions(self, x: Tensor, latents: Tensor) -> Tensor:
        w = self.encoder_view().expand_latents(latents.to(x.device))  # [k, L, d]
        return torch.einsum("bld,kld->blk", x, w)

    def encoder_weight(self) -> Tensor:
        return self.encoder_view().expand().permute(1, 2, 0)

    def decoder_weight(self) -> Tensor:
        return self.decoder_view().expand()

    def macs_per_token(self, batch_size: int) -> MacsPerToken:
        """Multiply-adds per token of encode, decode and a training step at ``batch_size``
        (``pipeline.coders.cost``: what the code runs, not what the parameter count says)."""
        return macs_per_token(self.config, batch_size)

    def dead_latents(self) -> Tensor:
        """``[n_latents]`` bool: no firing within the last ``dead_after_tokens`` tokens."""
        window = self.config.dead_after_tokens or DEAD_AFTER_TOKENS_CAP
        return self.tokens_since_fired >= window

    def may_have_dead(self) -> bool:
        """False only when no latent can be dead yet: decided on the host, from an upper
        bound on the counters (the rows recorded since they were last read), so a step
        never waits for the device. Reading ``dead.any()`` instead synced every step, and
        computing the (then zero) AuxK term always cost 1.67x the step on CPU (decoding
        ``auxk_k`` codes per token). The counters are read once after construction,
        loading or ``forget_firing_bound``."""
        if self._since_fired_bound is None:
            self._since_fired_bound = int(self.tokens_since_fired.max())
        return self._since_fired_bound >= (self.config.dead_after_tokens or DEAD_AFTER_TOKENS_CAP)

    def forget_firing_bound(self) -> None:
        """The counters changed behind ``record_firing`` (loaded, broadcast): read them
        again at the next step."""
        self._since_fired_bound = None

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.forget_firing_bound()

    def sparsity_coefficient(self, step: int, total_steps: int) -> float:
        c = self.config
        lam = {"relu": c.l1_coefficient, "jumprelu": c.l0_coefficient}.get(c.activation, 0.0)
        warm = c.sparsity_warmup_fraction * total_steps
        return lam * min(1.0, step / warm) if warm > 0 else lam

    def _training_input(
        self, x: Tensor, step: int, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor | None]:
        """Encoder input and the bool mask of altered tokens (None: input unaltered)."""
        return x, None

    def _extra_losses(
        self, ctx: dict[str, Any], step: int, total_steps: int
    ) -> dict[str, tuple[float, Tensor]]:
        """Additional ``name: (coefficient, term)`` pairs (fmxcoder's collapse penalty)."""
        return {}

    def training_loss(
        self, x: Tensor, step: int, total_steps: int, generator: torch.Generator | None = None
    ) -> LossOutput:
        """One batch's loss (call in train mode: BatchTopK selects over the batch only then).

        ``generator`` overrides the masking generator, which by default is a function of
        ``(config.seed, step)`` so that a resumed run draws the same masks."""
        c = self.config
        enc, dec = self.encoder_view(), self.decoder_view()  # per_latent materialises here, once
        x_in, token_mask = self._training_input(x, step, generator)
        pre = enc.encode(x_in) + self.b_enc
        f = self.activation(pre)
        x_hat = self._decode_codes(dec, f) + self.b_dec
        sq_err = (x_hat - x).pow(2)
        recon = sq_err.sum((1, 2)).mean()
        if c.activation == "relu":
            sparsity = l1_penalty(f, dec.layer_norms().sum(1))
        elif c.activation == "jumprelu":
            sparsity = self.activation.l0_penalty(pre)
        else:
            sparsity = recon.new_zeros(())
        lam = self.sparsity_coefficient(step, total_steps)
        loss = recon + lam * sparsity
        dead = self.dead_latents()
        auxk = recon.new_zeros(())
        if c.auxk_coefficient > 0 and self.may_have_dead():  # host-side: no sync per step
            residual = (x - x_hat).detach()
            # AuxK's codes are a TopK (+ ReLU) of pre: sparse decode is exact for any activation
            decode = partial(dec.decode_sparse, max_active=c.resolved_auxk_k * c.n_groups)
            auxk = auxk_loss(pre, dead, residual, decode, c.resolved_auxk_k, c.n_groups)
            loss = loss + c.auxk_coefficient * auxk
        ctx = {"x": x, "token_mask": token_mask, "codes": f, "dec": dec, "enc": enc}
        extra = self._extra_losses(ctx, step, total_steps)
        for coef, term in extra.values():
            loss = loss + coef * term
        with torch.no_grad():
            self._track_firing(f)
            self.activation.observe(f)
            terms = {
                "loss": loss,
                "recon": recon,
                "sparsity": sparsity,
                "sparsity_coefficient": recon.new_tensor(lam),
                "auxk": auxk,
                "l0": (f > 0).sum(-1).float().mean(),
                "mse": sq_err.mean(),
                "fvu": layer_fvu(x, x_hat),
                "dead_fraction": dead.float().mean(),
                "collapse": recon.new_zeros(()),
                **{name: term for name, (_, term) in extra.items()},
            }
        terms = {name: t.detach().float().reshape(()) for name, t in terms.items()}
        return LossOutput(loss=loss, terms=terms, codes=f.detach())

    @torch.no_grad()
    def _track_firing(self, f: Tensor) -> None:
        self.record_firing((f > 0).any(0), f.shape[0])

    def record_firing(self, fired: Tensor, rows: int) -> None:
        """Dead-latent counters advance by ``rows`` and reset where a latent ``fired``
        (pipeline/training/ddp.py passes the global batch's)."""
        self.tokens_since_fired.add_(rows).masked_fill_(fired, 0)
        if self._since_fired_bound is not None:
            self._since_fired_bound += rows
