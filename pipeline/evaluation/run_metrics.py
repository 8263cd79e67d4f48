"""One streaming pass over the held-out tokens that feeds every metric of every variant.

Chunks of the test split are decoded once (the union of the variants' layers), then each
variant normalises its own layers and encodes each sub-batch once; the codes feed the
reconstruction, sparsity, coherence, masking and top-context accumulators, an activation
histogram per latent, and the probing features (only the rows the probes need, and
per-document sums for the pooled sequence tasks). The raw residual of every layer is
collected for the same rows as the probing baseline. Memory is bounded by one chunk plus
the accumulators, never by the size of the split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import sparse
from torch import Tensor
from tqdm import tqdm

from pipeline.coders.base import SparseCoder
from pipeline.evaluation.bootstrap import DocumentErrors, DocumentIndex, LayerMoments
from pipeline.evaluation.coherence import (
    CoherenceAccumulator,
    CoherenceResult,
    MaskingAccumulator,
    MaskingResult,
    decoder_spread,
    normalised_mean,
)
from pipeline.evaluation.probing import decoder_norm_weights
from pipeline.evaluation.reconstruction import (
    ReconstructionAccumulator,
    ReconstructionResult,
    SparsityAccumulator,
    SparsityResult,
)
from pipeline.evaluation.spectrum import CP_SAMPLE_TOKENS, accumulator_for, decoder_floor, floor_fvu
from pipeline.evaluation.top_contexts import TopContexts
from pipeline.evaluation.trajectories import Trajectories, coder_trajectories
from pipeline.training.loader import ActivationLoader, Normaliser

# Activation histograms: fixed log10 bins (normalised code units) so one pass serves every
# latent without knowing its range in advance; values outside land in the end bins.
HIST_EDGES = np.linspace(-3.0, 3.0, 49)


@dataclass
class Variant:
    """A trained coder and how it reads the store."""

    name: str
    slug: str
    run_dir: Path
    coder: SparseCoder
    layers: list[int]  # indices into the store's hooks
    normaliser: Normaliser
    step: int
    kind: str
    columns: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    # training's massive-activation rule (pipeline.store.outliers)
    outlier_ratio: float | None = None

    @property
    def scale(self) -> Tensor:
        return self.normaliser.scale

    def mu(self) -> Tensor:
        n = self.normaliser
        return normalised_mean(n.mean, n.scale, n.centre)

    def normalise(self, raw_union: Tensor) -> Tensor:
        return self.normaliser.apply(raw_union[:, self.columns])


@dataclass(frozen=True)
class ProbeRows:
    """What the probes need from the pass: token rows (sorted) and a doc slot per row."""

    token_rows: np.ndarray  # sorted global rows
    doc_slot: np.ndarray  # per global row: index into doc_ids, or -1
    n_docs: int


class _FeatureRows:
    """Gathers features of the wanted rows in store order, and per-document sums."""

    def __init__(self, probe: ProbeRows) -> None:
        self.probe = probe
        self.blocks: list[sparse.csr_matrix | np.ndarray] = []
        self.rows: list[np.ndarray] = []
        self.doc_sums: Tensor | None = None
        self.doc_counts = torch.zeros(probe.n_docs, dtype=torch.float64)

    def update(self, rows: np.ndarray, feats: Tensor, as_sparse: bool) -> None:
        want = self.probe.token_rows
        if want.size:
            at = np.searchsorted(want, rows).clip(max=want.size - 1)
            hit = np.flatnonzero(want[at] == rows)
            if hit.size:
                block = feats[torch.from_numpy(hit).to(feats.device)].float().cpu().numpy()
                self.blocks.append(sparse.csr_matrix(block) if as_sparse else block)
                self.rows.append(rows[hit])
        slot = self.probe.doc_slot[rows]
        hit = np.flatnonzero(slot >= 0)
        if hit.size and self.probe.n_docs:
            f = feats[torch.from_numpy(hit).to(feats.device)].double().cpu()
            f = f.reshape(f.shape[0], -1)
            if self.doc_sums is None:
                self.doc_sums = torch.zeros(self.probe.n_docs, f.shape[1], dtype=torch.float64)
            target = torch.from_numpy(slot[hit])
            self.doc_sums.index_add_(0, target, f)
            self.doc_counts.index_add_(0, target, torch.ones(hit.size, dtype=torch.float64))

    def tokens(self) -> tuple[sparse.csr_matrix | np.ndarray | None, np.ndarray]:
        if not self.blocks:
            return None, np.zeros(0, dtype=np.int64)
        rows = np.concatenate(self.rows)
        order = np.argsort(rows, kind="stable")
        if sparse.issparse(self.blocks[0]):
            return sparse.vstack(self.blocks, format="csr")[order], rows[order]
        return np.concatenate(self.blocks)[order], rows[order]

    def doc_means(self) -> np.ndarray | None:
        if self.doc_sums is None:
            return None
        return (self.doc_sums / self.doc_counts.clamp_min(1)[:, None]).float().numpy()


@dataclass(frozen=True)
class VariantResult:
    variant: Variant
    recon: ReconstructionResult
    sparsity: SparsityResult
    coherence: CoherenceResult
    masking: MaskingResult | None
    d_eff: np.ndarray  # [m]
    top_values: np.ndarray  # [m, n_top]
    top_rows: np.ndarray  # [m, n_top]
    histogram: np.ndarray  # [m, len(HIST_EDGES) - 1]
    token_features: sparse.csr_matrix | None
    token_index: np.ndarray
    doc_features: np.ndarray | None  # [n_docs, m] pooled (decoder norms folded in)
    # best FVU of the decoder's subspace (pipeline.evaluation.spectrum)
    floor_fvu: float | None = None
    # per-latent trajectory statistics, "dec"/"enc" (None for per-layer coders)
    trajectories: dict[str, Trajectories] | None = None
    # per-document sums for pipeline.evaluation.bootstrap: error [docs, L], N_eff num/den
    doc_err: Tensor | None = None
    doc_fc: tuple[Tensor, Tensor] | None = None


class VariantPass:
    """Every accumulator of one variant; ``update`` takes normalised ``x[B, L, d]``."""

    def __init__(
        self,
        variant: Variant,
        probe: ProbeRows,
        n_top: int,
        masking_tokens: int,
        documents: DocumentIndex | None = None,
    ):
        coder = variant.coder
        self.variant, self.coder = variant, coder
        mu = variant.mu().to(variant.scale.device)
        self.recon = ReconstructionAccumulator(variant.scale)
        self.sparsity = SparsityAccumulator(coder.n_latents, coder.latent_layer(), coder.n_layers)
        self.documents = documents
        n_docs = documents.n_docs if documents is not None else 0
        self.doc_err = DocumentErrors(n_docs, variant.scale) if documents is not None else None
        self.coherence = CoherenceAccumulator(coder, mu, n_docs=n_docs)
        self.masking = MaskingAccumulator(coder, mu) if masking_tokens > 0 else None
        self.masking_left = masking_tokens
        self.top = TopContexts(coder.n_latents, n_top)
        self.edges = torch.from_numpy(HIST_EDGES[1:-1]).float()
        self.hist = torch.zeros(coder.n_latents * (len(HIST_EDGES) - 1), dtype=torch.long)
        self.fold = decoder_norm_weights(coder, variant.scale)
        self.features = _FeatureRows(probe)
        # a decoder confined to a fixed subspace: its floor on these same held-out tokens
        self.floor = decoder_floor(getattr(coder, "config", None))  # test coders have none
        self.floor_acc = (
            accumulator_for(self.floor, coder.n_layers, coder.d_model) if self.floor else None
        )
        self.floor_left = CP_SAMPLE_TOKENS if self.floor and self.floor.kind == "cp" else None

    @torch.no_grad()
    def update(self, rows: np.ndarray, x: Tensor) -> None:
        if self.floor_acc is not None and self.floor_left != 0:
            self.floor_acc.update(x if self.floor_left is None else x[: self.floor_left])
            if self.floor_left is not None:
                self.floor_left -= min(self.floor_left, x.shape[0])
        f = self.coder.encode(x)
        x_hat = self.coder.decode(f)
        self.recon.update(x, x_hat)
        self.sparsity.update(f)
        slots = None
        if self.documents is not None and self.doc_err is not None:
            slots = self.documents.slot[rows]
            self.doc_err.update(slots, x, x_hat)
            slots = torch.from_numpy(slots)
        self.coherence.update(x, f, slots)
        if self.masking is not None and self.masking_left > 0:
            self.masking.update(x[: self.masking_left], f[: self.masking_left])
            self.masking_left -= min(self.masking_left, x.shape[0])
        self.top.update(f, rows)
        token, latent = (f > 0).nonzero(as_tuple=True)
        bins = torch.bucketize(f[token, latent].float().log10().cpu(), self.edges)
        self.hist += torch.bincount(
            latent.cpu() * (len(HIST_EDGES) - 1) + bins, minlength=self.hist.numel()
        )
        self.features.update(rows, f * self.fold.to(f), as_sparse=True)

    def result(self) -> VariantResult:
        top_values, top_rows = self.top.result()
        token_x, token_index = self.features.tokens()
        return VariantResult(
            variant=self.variant,
            recon=self.recon.result(),
            sparsity=self.sparsity.result(),
            coherence=self.coherence.result(),
            masking=None if self.masking is None else self.masking.result(),
            d_eff=decoder_spread(self.coder, self.variant.scale),
            top_values=top_values,
            top_rows=top_rows,
            histogram=self.hist.view(self.coder.n_latents, -1).numpy(),
            token_features=token_x,
            token_index=token_index,
            doc_features=self.features.doc_means(),
            floor_fvu=self._floor_fvu(),
            trajectories=coder_trajectories(self.coder, self.variant.scale),
            doc_err=None if self.doc_err is None else self.doc_err.err,
            doc_fc=None if self.doc_err is None else self.coherence.per_document(),
        )

    def _floor_fvu(self) -> float | None:
        if self.floor is None or self.floor_acc is None or self.floor_acc.n == 0:
            return None
        return floor_fvu(self.floor_acc, self.floor)


@dataclass(frozen=True)
class ResidualFeatures:
    """The probing baseline: raw residuals of every read layer, ``[rows, L, d]``."""

    hooks: list[str]
    token_features: np.ndarray | None
    token_index: np.ndarray
    doc_features: np.ndarray | None  # [n_docs, L, d]


@dataclass(frozen=True)
class PassResult:
    variants: list[VariantResult]
    residual: ResidualFeatures
    eval_rows: np.ndarray  # the held-out rows evaluated, in store order
    moments: LayerMoments | None = None  # per-document layer moments (bootstrap)


def union_layers(variants: list[Variant]) -> list[int]:
    """Sorted union of the variants' layers; sets each variant's columns into it."""
    union = sorted({layer for v in variants for layer in v.layers})
    for v in variants:
        v.columns = torch.tensor([union.index(layer) for layer in v.layers])
    return union


def stream_pass(
    loader: ActivationLoader,
    variants: list[Variant],
    probe: ProbeRows,
    *,
    max_tokens: int | None = None,
    batch_size: int = 1024,
    n_top: int = 20,
    masking_tokens: int = 8192,
    progress: bool = True,
    documents: DocumentIndex | None = None,
) -> PassResult:
    """Stream the loader's split once (chunk by chunk, store order) through every variant;
    ``documents`` also keeps the per-document sums the bootstrap resamples."""
    passes = [VariantPass(v, probe, n_top, masking_tokens, documents) for v in variants]
    residual = _FeatureRows(probe)
    moments = LayerMoments(documents.n_docs) if documents is not None else None
    total = loader.n_tokens if max_tokens is None else min(max_tokens, loader.n_tokens)
    seen: list[np.ndarray] = []
    n_seen = 0
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="evaluate", disable=not progress)
    try:
        for rows, raw in loader.raw_batches():
            if n_seen >= total:
                break
            rows, raw = rows[: total - n_seen], raw[: total - n_seen]
            for start in range(0, rows.size, batch_size):
                r, x = rows[start : start + batch_size], raw[start : start + batch_size]
                residual.update(r, x, as_sparse=False)
                if moments is not None and documents is not None:
                    moments.update(documents.slot[r], x)
                for p in passes:
                    p.update(r, p.variant.normalise(x))
                bar.update(r.size)
            seen.append(rows)
            n_seen += rows.size
    finally:
        bar.close()
    token_x, token_index = residual.tokens()
    hooks = [loader.store.hook_names[layer] for layer in loader.layers]
    return PassResult(
        [p.result() for p in passes],
        ResidualFeatures(hooks, token_x, token_index, residual.doc_means()),
        np.concatenate(seen) if seen else np.zeros(0, dtype=np.int64),
        moments,
    )
