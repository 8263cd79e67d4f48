"""Multiply-adds per token of a coder's encode, decode and training step, from its config.

Parameters are not cost: a per_latent rank-R weight has about R/L of a dense one's
parameters, yet it is materialised every step and then used with the dense kernels. These
counts follow the tensor contractions the code actually runs (``factorized.py``,
``per_layer_sae.py``, ``base.SparseCoder.training_loss``), so they can be checked against
``torch.utils.flop_counter.FlopCounterMode`` (``tests/test_cost.py``).

Conventions:
- Only contractions count (matmuls, batched einsums, ``embedding_bag``'s gathered sums):
  activations, norms, masks and Adam are elementwise and left out. 1 MAC = 2 FLOPs.
- Backward is counted, not assumed to be 2x: each contraction costs one more pass of its
  own size per operand that needs a gradient. The encoder's first contraction reads the
  activations (no gradient), so it costs 2x its forward; one between weights and codes 3x.
- Per-step work (materialising per_latent weights, decoder layer norms for the L1 and
  collapse terms) is divided by the batch size.
- The training decode is the sparse path (``embedding_bag`` over the active latents) when
  the code takes it: TopK (``k`` per group) and BatchTopK (``k`` on average per token, the
  code bounds a batch by its densest row) with at most ``SPARSE_DECODE_MAX_DENSITY * m``
  active; ReLU and JumpReLU are counted dense. Per-layer SAEs have no sparse path.
- ``step`` assumes no dead latents; ``step_auxk`` adds AuxK's decode of ``auxk_k`` codes
  per group, which runs once any latent is dead (dense when ``auxk_k`` exceeds the sparse
  limit, as it does at the default ``d_model // 2``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pipeline.coders.factorized import SPARSE_DECODE_MAX_DENSITY, factor_parameters

# Per-layer SAEs' block-diagonal weights: one more reading beside the factorisations.
BLOCK = "block"


@dataclass(frozen=True)
class Product:
    """One contraction: multiply-adds in the forward pass and how many of its two operands
    need a gradient (0-2); each needs one backward pass of the same size."""

    macs: float
    grads: int

    @property
    def step(self) -> float:
        return self.macs * (1 + self.grads)


@dataclass(frozen=True)
class Shape:
    """A ``[m, L, d]`` weight under one reading (``kind``, ``rank``)."""

    kind: str
    m: int
    n_layers: int
    d: int
    rank: int | None = None

    @property
    def r(self) -> int:
        assert self.rank is not None, f"{self.kind} needs a rank"
        return self.rank

    def encode(self) -> list[Product]:
        """Per token: ``WeightView.encode`` (the input needs no gradient)."""
        m, n, d = self.m, self.n_layers, self.d
        if self.kind in ("dense", "per_latent", BLOCK):  # per_latent: a materialised dense W
            return [Product(n * d * m if self.kind != BLOCK else m * d, 1)]
        if self.kind == "shared_basis":  # project onto G, then one [R*d, m] matmul
            return [Product(n * self.r * d, 1), Product(self.r * d * m, 2)]
        if self.kind == "cp":  # onto the atoms' C, weighted by B over layers, through A
            return [Product(n * d * self.r, 1), Product(n * self.r, 2), Product(self.r * m, 2)]
        raise ValueError(f"unknown factorization {self.kind!r}")

    def decode(self, active: int | None = None) -> list[Product]:
        """Per token: ``decode`` (``active`` None) or ``decode_sparse`` through ``active``
        codes; codes and weights both need gradients."""
        m, n, d = self.m, self.n_layers, self.d
        rows = m if active is None else active
        if self.kind in ("dense", "per_latent"):
            return [Product(rows * n * d, 2)]
        if self.kind == BLOCK:
            return [Product(m * d, 2)]
        if self.kind == "shared_basis":
            return [Product(rows * self.r * d, 2), Product(self.r * d * n, 2)]
        if self.kind == "cp":
            return [Product(rows * self.r, 2), Product(n * self.r * d, 2)]
        raise ValueError(f"unknown factorization {self.kind!r}")

    def has_sparse_decode(self) -> bool:
        return self.kind != BLOCK

    def prepare(self) -> list[Product]:
        """Per step: building the view (per_latent materialises ``W = A B``)."""
        if self.kind == "per_latent":
            return [Product(self.m * self.n_layers * self.r * self.d, 2)]
        return []

    def layer_norms(self) -> list[Product]:
        """Per step: ``WeightView.layer_norms`` (contractions only; dense norms have none)."""
        m, n, d = self.m, self.n_layers, self.d
        if self.kind == "shared_basis":  # Gram of V, then G^T Gram G
            r = self.r
            return [Product(m * r * r * d, 2), Product(m * n * r * r, 2), Product(m * n * r, 2)]
        if self.kind == "cp" and self.r <= d:  # K = C C^T, then the five-way einsum
            r = self.r
            return [Product(r * r * d, 2), Product(m * n * r * r, 2), Product(m * n * r, 2)]
        if self.kind == "cp":  # R > d: (A * B_l) C, one layer at a time
            return [Product(n * m * self.r * d, 2)]
        return []


def _total(products: list[Product], backward: bool = True) -> float:
    return sum(p.step if backward else p.macs for p in products)


@dataclass(frozen=True)
class MacsPerToken:
    """Multiply-adds per token (module docstring for the conventions)."""

    encode: float  # forward
    decode: float  # forward, dense: every latent
    decode_sparse: float | None  # forward through the active latents (None: no sparse path)
    step: float  # one training step (forward + backward), no dead latents
    step_auxk: float  # the same with AuxK running
    batch_size: int  # the per-step work above is divided by this

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _shapes(config: Any) -> tuple[Shape, Shape]:
    """Encoder and decoder readings of a coder config (duck-typed: no import cycle)."""
    n, d = config.n_layers, config.d_model
    if config.kind == "per_layer_sae":
        block = Shape(BLOCK, config.total_latents, n, d)
        return block, block
    enc = getattr(config, "encoder_factorization", "dense")
    dec = getattr(config, "decoder_factorization", "dense")
    rank = getattr(config, "rank", None)
    m = config.n_latents
    return Shape(enc, m, n, d, rank), Shape(dec, m, n, d, rank)


def _sparse_rows(config: Any, dec: Shape, per_group: int | None) -> int | None:
    """Active codes per token the sparse decode gathers, or None when it is not taken."""
    if per_group is None or not dec.has_sparse_decode():
        return None
    rows = per_group * config.n_groups
    return rows if rows <= SPARSE_DECODE_MAX_DENSITY * dec.m else None


def macs_per_token(config: Any, batch_size: int) -> MacsPerToken:
    """Multiply-adds per token of a coder config's encode, decode and training step at
    ``batch_size`` tokens per step."""
    enc, dec = _shapes(config)
    sparse_activation = config.activation in ("topk", "batchtopk")
    rows = _sparse_rows(config, dec, config.k if sparse_activation else None)
    per_step = enc.prepare() + dec.prepare()
    if config.activation == "relu":  # L1 weighted by the decoder's layer norms
        per_step += dec.layer_norms()
    step = _total(enc.encode()) + _total(dec.decode(rows))
    if getattr(config, "collapse_coefficient", 0) > 0:  # clean codes: one more encode, no grad
        step += _total(enc.encode(), backward=False)
        per_step += dec.layer_norms()
    step += _total(per_step) / batch_size
    aux_rows = _sparse_rows(config, dec, config.resolved_auxk_k)
    step_auxk = step + (_total(dec.decode(aux_rows)) if config.auxk_coefficient > 0 else 0.0)
    active = config.k * config.n_groups if config.k is not None else None
    sparse = _total(dec.decode(active), backward=False) if active is not None else None
    return MacsPerToken(
        encode=_total(enc.encode(), backward=False),
        decode=_total(dec.decode(), backward=False),
        decode_sparse=sparse if dec.has_sparse_decode() else None,
        step=step,
        step_auxk=step_auxk,
        batch_size=batch_size,
    )


def parameter_count(config: Any) -> int:
    """Trainable parameters of the coder a config builds, without building it (what a
    parameter-matched variant is matched on; equals ``Coder.num_parameters``)."""
    enc, dec = _shapes(config)
    m, n, d = config.total_latents, config.n_layers, config.d_model
    weights = sum(
        m * d if s.kind == BLOCK else factor_parameters(s.kind, m, n, d, s.rank) for s in (enc, dec)
    )
    threshold = m if config.activation == "jumprelu" else 0
    return weights + m + n * d + threshold  # + b_enc, b_dec, JumpReLU's log-thresholds


Measure = Literal["params", "step_macs"]
MAX_MATCHED_LATENTS = 1 << 22


def measure_fn(measure: Measure, batch_size: int) -> Callable[[Any], float]:
    """A config's parameter count or training-step multiply-adds per token."""
    if measure == "params":
        return parameter_count
    return lambda config: macs_per_token(config, batch_size).step


def matching_latents(config: Any, measure: Measure, goal: float, batch_size: int) -> int | None:
    """The smallest ``n_latents`` (at least ``k``) at which ``config`` reaches ``goal`` in
    ``measure``, or None below ``MAX_MATCHED_LATENTS``. A scan, not a bisection: step MACs
    drop where the sparse decode takes over (``k <= m / 16``), so they are not monotone."""
    fn = measure_fn(measure, batch_size)
    for n in range(max(config.k or 1, 1), MAX_MATCHED_LATENTS):
        if fn(config.model_copy(update={"n_latents": n})) >= goal:
            return n
    return None
