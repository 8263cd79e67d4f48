"""Parameterisations of a ``[latent, layer, d_model]`` weight along the layer axis.

- ``dense``: ``W[m, L, d]``.
- ``shared_basis`` (Tucker along layers): ``W[i, l] = sum_r G[l, r] V[i, r]``, ``G`` shared by
  all latents. The fast path never builds ``W``: it projects onto the ``R`` basis first
  (``z_r = sum_l G[l, r] x_l``), then does one ``[B, R*d] x [R*d, m]`` matmul, so parameters
  and FLOPs shrink by ``R / L``.
- ``per_latent``: ``W[i, l] = sum_r A[i, l, r] B[i, r]``; materialised once per ``view()``
  (i.e. once per step) and then used with the dense kernels (sparse decode included).
- ``cp`` (CP / PARAFAC): ``W[i, l, :] = sum_r A[i, r] B[l, r] C[r, :]``: every latent mixes
  ``R`` rank-1 cross-layer atoms ``B[:, r] (x) C[r, :]`` shared by all latents. ``R`` may
  exceed ``L``; reconstructions lie in the ``R``-dim span of the atoms in ``R^(L*d)``, so
  ``R`` must be large (see ``pipeline.evaluation.spectrum.cp_floor_fvu``). The fast path never
  builds ``W``: encode projects onto the atoms (``[B, L, d] @ C^T``, weighted by ``B``, summed over
  layers) and then through ``A``; decode goes ``f @ A -> [B, R]``, times ``B``, ``@ C``.

``shared_basis`` with ``R < L`` and ``cp`` with ``R < L*d`` confine reconstructions to a fixed
subspace and so have a floor FVU (``pipeline.evaluation.spectrum``); ``dense`` and ``per_latent``
do not.
A further reading, per-latent layer profiles mixed from a shared set of ``S`` layer profiles,
is left out on purpose: its layer axis lies in the span of those ``S`` profiles, so it has the
same floor as ``shared_basis`` at rank ``S`` and adds nothing the two above do not measure.

A module's ``view()`` gives a ``WeightView`` that encodes, decodes and measures per-layer
norms. Encoder and decoder are separate modules, so they are factorised independently.

Decoding has two paths. ``decode(f)`` is the dense reference (``f @ W``). ``decode_sparse(f)``
is the fast path for sparse codes (TopK, BatchTopK, AuxK): it gathers each row's nonzeros and
sums only those rows of ``W`` (``embedding_bag``), so forward and backward cost ``B k L d``
instead of ``B m L d``. It returns the same ``x_hat`` and the same gradient for ``W``, but
gives ``f`` its gradient on ``f``'s support only (zero where ``f == 0``): exact for every
activation whose backward ignores the gradient at inactive latents (ReLU, TopK, BatchTopK),
not for JumpReLU, whose threshold pseudo-derivative reads it just below the threshold.
Codes too dense for it (more than ``SPARSE_DECODE_MAX_DENSITY * m`` nonzeros in some row)
fall back to the reference path.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Factorization = Literal["dense", "shared_basis", "per_latent", "cp"]
Role = Literal["encoder", "decoder"]

# decode_sparse gathers rows of W when no code row has more than this fraction of m nonzeros.
# Decode forward + backward on CPU (B=512, L*d=5760, m=1024/4096): sparse 1.4-1.5x faster at
# 1/16, 0.7-1.0x at 1/8, so the dense matmul wins beyond about 1/10.
SPARSE_DECODE_MAX_DENSITY = 1 / 16

# CP-ALS sweeps in CPWeight.load_dense_ (init_tied_ uses it when only one side is cp).
CP_ALS_SWEEPS = 20


def sparse_support(f: Tensor, max_active: int | None = None) -> tuple[Tensor, Tensor] | None:
    """Each row's nonzeros of ``f [B, m]`` as ``(indices, values)``, both ``[B, n]``; None
    when a row may hold more than ``SPARSE_DECODE_MAX_DENSITY * m`` of them.

    ``n`` is ``max_active``, a bound the caller guarantees (TopK's ``k``; a row with more
    nonzeros would lose some), or, if None, the largest count in the batch (a host sync on an
    accelerator). Shorter rows are padded with zero values at arbitrary indices. The values
    are differentiable in ``f`` on its support only: padding entries pass no gradient back.
    """
    batch, m = f.shape
    if batch == 0:
        return None
    if max_active is None:
        max_active = int((f != 0).sum(1).max())
    if max_active > SPARSE_DECODE_MAX_DENSITY * m:
        return None
    n = min(max(max_active, 1), m)  # >= 1: W must get a (zero) gradient even if f == 0
    idx = f.detach().abs().topk(n, dim=1, sorted=False).indices
    vals = f.gather(1, idx)
    return idx, vals.masked_fill(vals.detach() == 0, 0.0)


def sparse_matmul(f: Tensor, w: Tensor, max_active: int | None = None) -> Tensor | None:
    """``f @ w`` for ``f [B, m]``, ``w [m, n]`` from ``f``'s nonzeros alone (see
    ``sparse_support`` for ``max_active`` and the gradient of ``f``); None if ``f`` is too
    dense, so that the caller uses its dense path."""
    support = sparse_support(f, max_active)
    if support is None:
        return None
    idx, vals = support
    return F.embedding_bag(idx, w, per_sample_weights=vals.to(w.dtype), mode="sum")


class WeightView(ABC):
    """A ``[m, L, d]`` weight ready to use for one step (factors or a materialised tensor)."""

    @abstractmethod
    def encode(self, x: Tensor) -> Tensor:
        """``pre[b, i] = sum_l <x[b, l], W[i, l]>`` (no bias)."""

    @abstractmethod
    def decode(self, f: Tensor) -> Tensor:
        """``x_hat[b, l] = sum_i f[b, i] W[i, l]`` (no bias): the dense reference path."""

    def decode_sparse(self, f: Tensor, max_active: int | None = None) -> Tensor:
        """As ``decode``, through only the nonzeros of sparse codes; ``f`` gets its gradient
        on its support only (module docstring). ``max_active``: a guaranteed bound on the
        nonzeros per row, or None to measure it. Views without a sparse kernel, and codes
        too dense for it, use ``decode``."""
        return self.decode(f)

    @abstractmethod
    def layer_norms(self) -> Tensor:
        """``||W[i, l]||`` as ``[m, L]``, differentiable."""

    @abstractmethod
    def expand_latents(self, latents: Tensor) -> Tensor:
        """Dense rows ``W[latents]`` as ``[k, L, d]``."""

    @abstractmethod
    def expand(self) -> Tensor:
        """The dense ``[m, L, d]`` weight (evaluation and reference paths only)."""


class DenseView(WeightView):
    def __init__(self, w: Tensor) -> None:
        self.w = w

    def encode(self, x: Tensor) -> Tensor:
        m = self.w.shape[0]
        return x.reshape(x.shape[0], -1) @ self.w.reshape(m, -1).T

    def decode(self, f: Tensor) -> Tensor:
        return (f @ self.w.reshape(self.w.shape[0], -1)).view(f.shape[0], *self.w.shape[1:])

    def decode_sparse(self, f: Tensor, max_active: int | None = None) -> Tensor:
        y = sparse_matmul(f, self.w.reshape(self.w.shape[0], -1), max_active)
        return self.decode(f) if y is None else y.view(f.shape[0], *self.w.shape[1:])

    def layer_norms(self) -> Tensor:
        return self.w.norm(dim=-1)

    def expand_latents(self, latents: Tensor) -> Tensor:
        return self.w[latents]

    def expand(self) -> Tensor:
        return self.w


class SharedBasisView(WeightView):
    def __init__(self, g: Tensor, v: Tensor) -> None:
        self.g, self.v = g, v  # [L, R], [m, R, d]

    def encode(self, x: Tensor) -> Tensor:
        z = torch.einsum("bld,lr->brd", x, self.g)  # project onto the layer basis first
        return z.reshape(x.shape[0], -1) @ self.v.reshape(self.v.shape[0], -1).T

    def decode(self, f: Tensor) -> Tensor:
        y = f @ self.v.reshape(self.v.shape[0], -1)  # basis coefficients first, [B, R*d]
        return torch.einsum("brd,lr->bld", y.view(f.shape[0], *self.v.shape[1:]), self.g)

    def decode_sparse(self, f: Tensor, max_active: int | None = None) -> Tensor:
        y = sparse_matmul(f, self.v.reshape(self.v.shape[0], -1), max_active)
        if y is None:
            return self.decode(f)
        return torch.einsum("brd,lr->bld", y.view(f.shape[0], *self.v.shape[1:]), self.g)

    def layer_norms(self) -> Tensor:
        # ||sum_r G[l,r] V[i,r]||^2 = G[l]^T (V_i V_i^T) G[l]: costs m R^2 d, not m L d.
        gram = torch.einsum("ird,isd->irs", self.v, self.v)
        sq = torch.einsum("lr,irs,ls->il", self.g, gram, self.g)
        return sq.clamp_min(1e-20).sqrt()

    def expand_latents(self, latents: Tensor) -> Tensor:
        return torch.einsum("lr,krd->kld", self.g, self.v[latents])

    def expand(self) -> Tensor:
        return torch.einsum("lr,ird->ild", self.g, self.v)


class CPView(WeightView):
    def __init__(self, a: Tensor, b: Tensor, c: Tensor) -> None:
        self.a, self.b, self.c = a, b, c  # [m, R], [L, R], [R, d]

    def encode(self, x: Tensor) -> Tensor:
        z = torch.einsum("blr,lr->br", x @ self.c.T, self.b)  # atom coefficients, [B, R]
        return z @ self.a.T

    def _from_atoms(self, y: Tensor) -> Tensor:
        """``[B, R]`` atom coefficients to ``[B, L, d]``."""
        return (y[:, None, :] * self.b) @ self.c

    def decode(self, f: Tensor) -> Tensor:
        return self._from_atoms(f @ self.a)

    def decode_sparse(self, f: Tensor, max_active: int | None = None) -> Tensor:
        y = sparse_matmul(f, self.a, max_active)
        return self.decode(f) if y is None else self._from_atoms(y)

    def layer_norms(self) -> Tensor:
        rank, d = self.c.shape
        if rank <= d:
            # ||(A_i * B_l) C||^2 = (A_i * B_l)^T K (A_i * B_l), K = C C^T: m L R^2, not m L R d
            k = self.c @ self.c.T
            sq = torch.einsum("ir,lr,rs,ls,is->il", self.a, self.b, k, self.b, self.a)
            return sq.clamp_min(1e-20).sqrt()
        # R > d: one layer at a time, [m, R] @ [R, d], never the whole [m, L, d] at once
        return torch.stack([((self.a * bl) @ self.c).norm(dim=-1) for bl in self.b], dim=1)

    def expand_latents(self, latents: Tensor) -> Tensor:
        return torch.einsum("kr,lr,rd->kld", self.a[latents], self.b, self.c)

    def expand(self) -> Tensor:
        return torch.einsum("ir,lr,rd->ild", self.a, self.b, self.c)


class LayerWeight(nn.Module, ABC):
    """A factorised ``[m, L, d]`` weight; ``role`` fixes the orientation of ``expand()``."""

    kind: Factorization

    def __init__(self, n_latents: int, n_layers: int, d_model: int, role: Role) -> None:
        super().__init__()
        self.n_latents, self.n_layers, self.d_model, self.role = n_latents, n_layers, d_model, role

    @abstractmethod
    def view(self) -> WeightView: ...

    @abstractmethod
    def init_random_(self, generator: torch.Generator) -> None:
        """Random factors (before rescaling by ``rescale_``)."""

    @abstractmethod
    def load_dense_(self, w: Tensor) -> None:
        """Set the factors to the best rank-limited fit of a dense ``[m, L, d]`` weight."""

    @abstractmethod
    def _latent_scaled(self) -> Tensor:
        """The factor whose rows scale a latent's whole weight (used by ``rescale_``)."""

    def expand(self) -> Tensor:
        """Dense weight: ``[L, d, m]`` for an encoder, ``[m, L, d]`` for a decoder."""
        w = self.view().expand()
        return w.permute(1, 2, 0) if self.role == "encoder" else w

    @torch.no_grad()
    def rescale_(self, norm: float) -> None:
        """Scale each latent so the RMS over layers of ``||W[i, l]||`` equals ``norm``."""
        rms = self.view().layer_norms().pow(2).mean(1).sqrt().clamp_min(1e-12)
        t = self._latent_scaled()
        t.mul_((norm / rms).view(-1, *([1] * (t.dim() - 1))))


class DenseWeight(LayerWeight):
    kind = "dense"

    def __init__(self, n_latents: int, n_layers: int, d_model: int, role: Role) -> None:
        super().__init__(n_latents, n_layers, d_model, role)
        self.w = nn.Parameter(torch.empty(n_latents, n_layers, d_model))

    def view(self) -> WeightView:
        return DenseView(self.w)

    @torch.no_grad()
    def init_random_(self, generator: torch.Generator) -> None:
        w = torch.randn(self.w.shape, generator=generator)
        self.w.copy_(w / w.norm(dim=-1, keepdim=True))  # unit rows per (latent, layer)

    @torch.no_grad()
    def load_dense_(self, w: Tensor) -> None:
        self.w.copy_(w)

    def _latent_scaled(self) -> Tensor:
        return self.w.data


class SharedBasisWeight(LayerWeight):
    kind = "shared_basis"

    def __init__(self, n_latents: int, n_layers: int, d_model: int, role: Role, rank: int):
        super().__init__(n_latents, n_layers, d_model, role)
        self.rank = rank
        self.g = nn.Parameter(torch.empty(n_layers, rank))
        self.v = nn.Parameter(torch.empty(n_latents, rank, d_model))

    def view(self) -> WeightView:
        return SharedBasisView(self.g, self.v)

    @torch.no_grad()
    def init_random_(self, generator: torch.Generator) -> None:
        q, _ = torch.linalg.qr(torch.randn(self.n_layers, self.rank, generator=generator))
        self.g.copy_(q)  # orthonormal columns
        self.v.copy_(torch.randn(self.v.shape, generator=generator))

    @torch.no_grad()
    def load_dense_(self, w: Tensor) -> None:
        # G = top-R left singular vectors of the layer unfolding [L, m*d] (HOSVD step):
        # exact when w already has layer rank <= R.
        unfold = w.permute(1, 0, 2).reshape(self.n_layers, -1).double()
        _, vecs = torch.linalg.eigh(unfold @ unfold.T)
        g = vecs[:, -self.rank :].flip(-1).to(w.dtype)
        self.g.copy_(g)
        self.v.copy_(torch.einsum("lr,ild->ird", g, w))

    def _latent_scaled(self) -> Tensor:
        return self.v.data


class PerLatentWeight(LayerWeight):
    kind = "per_latent"

    def __init__(self, n_latents: int, n_layers: int, d_model: int, role: Role, rank: int):
        super().__init__(n_latents, n_layers, d_model, role)
        self.rank = rank
        self.a = nn.Parameter(torch.empty(n_latents, n_layers, rank))
        self.b = nn.Parameter(torch.empty(n_latents, rank, d_model))

    def view(self) -> WeightView:
        return DenseView(torch.einsum("ilr,ird->ild", self.a, self.b))

    @torch.no_grad()
    def init_random_(self, generator: torch.Generator) -> None:
        self.a.copy_(torch.randn(self.a.shape, generator=generator) / self.rank**0.5)
        self.b.copy_(torch.randn(self.b.shape, generator=generator))

    @torch.no_grad()
    def load_dense_(self, w: Tensor) -> None:
        # Per-latent truncated SVD of each [L, d] slice: the best rank-R fit of every row.
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        r = min(self.rank, s.shape[-1])
        self.a.zero_()
        self.b.zero_()
        self.a[..., :r].copy_(u[..., :r] * s[:, None, :r])
        self.b[:, :r].copy_(vh[:, :r])

    def _latent_scaled(self) -> Tensor:
        return self.b.data


class CPWeight(LayerWeight):
    kind = "cp"

    def __init__(self, n_latents: int, n_layers: int, d_model: int, role: Role, rank: int):
        super().__init__(n_latents, n_layers, d_model, role)
        self.rank = rank
        self.a = nn.Parameter(torch.empty(n_latents, rank))
        self.b = nn.Parameter(torch.empty(n_layers, rank))
        self.c = nn.Parameter(torch.empty(rank, d_model))

    def view(self) -> WeightView:
        return CPView(self.a, self.b, self.c)

    @torch.no_grad()
    def init_random_(self, generator: torch.Generator) -> None:
        # unit atoms (B[:, r] (x) C[r] has norm 1); each latent a random mix of them
        b = torch.randn(self.b.shape, generator=generator)
        c = torch.randn(self.c.shape, generator=generator)
        self.b.copy_(b / b.norm(dim=0, keepdim=True))
        self.c.copy_(c / c.norm(dim=1, keepdim=True))
        self.a.copy_(torch.randn(self.a.shape, generator=generator) / self.rank**0.5)

    @torch.no_grad()
    def load_dense_(self, w: Tensor, sweeps: int = CP_ALS_SWEEPS) -> None:
        """Fit by alternating least squares (CP-ALS), ``sweeps`` rounds of exact
        least-squares updates of A, then B, then C given the other two.

        Start: B and C from the leading eigenvectors of the layer and d-mode unfoldings
        (random unit columns beyond their rank), A by least squares. Each update cannot
        increase the error, so the fit is at least as good as that start; it is a local
        optimum, not the global best rank-R fit (which is NP-hard in general).
        """
        wd = w.double()
        gen = torch.Generator().manual_seed(0)
        b = _leading_directions(wd.permute(1, 0, 2).reshape(self.n_layers, -1), self.rank, gen)
        c = _leading_directions(wd.permute(2, 0, 1).reshape(self.d_model, -1), self.rank, gen).T
        a = _cp_update(torch.einsum("ild,lr,rd->ir", wd, b, c), b.T @ b, c @ c.T)
        for _ in range(sweeps):
            b = _cp_update(torch.einsum("ild,ir,rd->lr", wd, a, c), a.T @ a, c @ c.T)
            c = _cp_update(torch.einsum("ild,ir,lr->dr", wd, a, b), a.T @ a, b.T @ b).T
            a = _cp_update(torch.einsum("ild,lr,rd->ir", wd, b, c), b.T @ b, c @ c.T)
        for param, value in ((self.a, a), (self.b, b), (self.c, c)):
            param.copy_(value.to(param.dtype))

    def _latent_scaled(self) -> Tensor:
        return self.a.data


def _leading_directions(unfold: Tensor, rank: int, generator: torch.Generator) -> Tensor:
    """``[n, rank]``: the top eigenvectors of ``unfold @ unfold.T``; random unit columns past
    ``n`` (CP ranks may exceed a mode's size)."""
    _, vecs = torch.linalg.eigh(unfold @ unfold.T)
    top = vecs.flip(-1)[:, :rank]
    extra = torch.randn(unfold.shape[0], rank - top.shape[1], generator=generator, dtype=top.dtype)
    return torch.cat([top, extra / extra.norm(dim=0, keepdim=True)], dim=1)


def _cp_update(mttkrp: Tensor, gram1: Tensor, gram2: Tensor) -> Tensor:
    """One CP-ALS least-squares update: ``mttkrp @ pinv(gram1 * gram2)``."""
    return mttkrp @ torch.linalg.pinv(gram1 * gram2, hermitian=True)


def factor_parameters(
    kind: Factorization, n_latents: int, n_layers: int, d_model: int, rank: int | None
) -> int:
    """Parameters of one ``[m, L, d]`` weight under ``kind`` (matches ``build_weight``)."""
    m, n, d = n_latents, n_layers, d_model
    if kind == "dense":
        return m * n * d
    assert rank is not None, f"{kind} needs a rank"
    counts = {
        "shared_basis": n * rank + m * rank * d,
        "per_latent": m * rank * (n + d),
        "cp": rank * (m + n + d),
    }
    if kind not in counts:
        raise ValueError(f"unknown factorization {kind!r}")
    return counts[kind]


def build_weight(
    kind: Factorization, n_latents: int, n_layers: int, d_model: int, role: Role, rank: int | None
) -> LayerWeight:
    if kind == "dense":
        return DenseWeight(n_latents, n_layers, d_model, role)
    assert rank is not None, f"{kind} needs a rank"
    if kind == "shared_basis":
        return SharedBasisWeight(n_latents, n_layers, d_model, role, rank)
    if kind == "per_latent":
        return PerLatentWeight(n_latents, n_layers, d_model, role, rank)
    if kind == "cp":
        return CPWeight(n_latents, n_layers, d_model, role, rank)
    raise ValueError(f"unknown factorization {kind!r}")


@torch.no_grad()
def init_tied_(
    encoder: LayerWeight, decoder: LayerWeight, norm: float, generator: torch.Generator
) -> None:
    """Small random decoder rows; the encoder starts as the decoder's transpose.

    Same parameterisation and rank: the factors are copied. Otherwise the encoder is set to
    the best fit of the decoder's dense expansion that its parameterisation allows.
    """
    decoder.init_random_(generator)
    decoder.rescale_(norm)
    same = type(encoder) is type(decoder) and getattr(encoder, "rank", 0) == getattr(
        decoder, "rank", 0
    )
    if same:
        for pe, pd in zip(encoder.parameters(), decoder.parameters(), strict=True):
            pe.copy_(pd)
    else:
        encoder.load_dense_(decoder.view().expand())
