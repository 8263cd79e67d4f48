"""Bootstrap intervals over held-out documents, so one seed still shows its noise.

Tokens of one document are not independent, so the resampling unit is the document: each
replicate draws the evaluated documents with replacement (one multiplicity per document,
shared by every variant and metric: differences are paired). The streaming pass keeps
per-document sums (error and moments per layer, coherence numerators and denominators per
latent), so a replicate of FVU, MSE or N_eff is a weighted sum, not a second pass. The
probe is refitted inside each replicate with its latents re-chosen on the resampled train
side, which also measures how often its top-k set changes. The coherent count comes from
a random sample of latents, so its interval resamples those latents instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import sparse, stats
from torch import Tensor

from pipeline.evaluation.probing import ProbeSplit, rank_features

if TYPE_CHECKING:  # run_metrics and probe_suite import this module
    from pipeline.evaluation.probe_suite import ProbeTasks
    from pipeline.evaluation.run_metrics import VariantResult

N_BOOT = 200
LEVEL = 0.95


@dataclass(frozen=True)
class DocumentIndex:
    """The evaluated documents (sorted ids) and each global token row's slot among them."""

    doc_ids: np.ndarray
    slot: np.ndarray  # per global row: index into doc_ids, -1 for rows not evaluated

    @classmethod
    def of_rows(cls, doc_of_row: np.ndarray, eval_rows: np.ndarray) -> DocumentIndex:
        doc_ids = np.unique(doc_of_row[eval_rows])
        slot = np.full(doc_of_row.size, -1, dtype=np.int64)
        slot[eval_rows] = np.searchsorted(doc_ids, doc_of_row[eval_rows])
        return cls(doc_ids, slot)

    @property
    def n_docs(self) -> int:
        return int(self.doc_ids.size)

    def slots_of_docs(self, doc_ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.doc_ids, doc_ids)


def resample_counts(n_docs: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """``[n_boot, n_docs]`` multiplicities: each replicate draws ``n_docs`` documents with
    replacement (numpy's seeded generator: the same draws on every machine)."""
    draws = np.random.default_rng(seed).integers(0, n_docs, size=(n_boot, n_docs))
    counts = np.zeros((n_boot, n_docs), dtype=np.int64)
    np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1)
    return counts


def interval(
    values: np.ndarray,
    level: float = LEVEL,
    n_units: int | None = None,
    estimate: float | None = None,
) -> list[float] | None:
    """The percentile interval of the finite replicates; None if under half are finite.

    With ``n_units`` (documents resampled), Hesterberg's expanded percentile interval: the
    plain one is too narrow with few units (the bootstrap sd is short by sqrt((n-1)/n) and a
    normal quantile stands in for Student's t), so its tails are taken at
    ``Phi(-sqrt(n / (n - 1)) * t_{n-1})`` instead of ``(1 - level) / 2``. With the full
    data's ``estimate``, bias-corrected (Efron's BC): a resampled FVU is biased (duplicated
    documents shrink the variance around the mean), which would otherwise shift the
    interval off the estimate."""
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    if finite.size == 0 or finite.size < values.size / 2:
        return None
    tail = (1 - level) / 2
    if n_units is not None and n_units > 1:
        t = stats.t.ppf(1 - tail, n_units - 1)
        tail = float(stats.norm.cdf(-np.sqrt(n_units / (n_units - 1)) * t))
    quantiles = np.array([tail, 1 - tail])
    if estimate is not None and np.isfinite(estimate):
        below = (np.sum(finite < estimate) + 0.5 * np.sum(finite == estimate)) / finite.size
        z0 = stats.norm.ppf(np.clip(below, 0.5 / finite.size, 1 - 0.5 / finite.size))
        quantiles = stats.norm.cdf(2 * z0 + stats.norm.ppf(quantiles))
    lo, hi = np.percentile(finite, 100 * quantiles)
    return [float(lo), float(hi)]


class LayerMoments:
    """Per document: token count, and sum and squared norm of each layer's raw activation
    around a fixed shift (the first batch's mean), in float64; shared by every variant."""

    def __init__(self, n_docs: int) -> None:
        self.n_docs = n_docs
        self.count = torch.zeros(n_docs, dtype=torch.float64)
        self.sum: Tensor | None = None  # [docs, L, d]
        self.sum_sq: Tensor | None = None  # [docs, L]
        self.shift: Tensor | None = None

    def update(self, slots: np.ndarray, raw: Tensor) -> None:
        raw = raw.detach().cpu().double()
        if self.shift is None:
            self.shift = raw.mean(0)
            self.sum = torch.zeros(self.n_docs, *raw.shape[1:], dtype=torch.float64)
            self.sum_sq = torch.zeros(self.n_docs, raw.shape[1], dtype=torch.float64)
        centred = raw - self.shift
        target = torch.from_numpy(slots)
        self.count.index_add_(0, target, torch.ones(slots.size, dtype=torch.float64))
        self.sum.index_add_(0, target, centred)
        self.sum_sq.index_add_(0, target, centred.pow(2).sum(-1))


class DocumentErrors:
    """Per document and layer: the squared reconstruction error in raw units."""

    def __init__(self, n_docs: int, scale: Tensor) -> None:
        self.inv = (1.0 / scale.detach().double().cpu()).view(1, -1, 1)
        self.err = torch.zeros(n_docs, self.inv.shape[1], dtype=torch.float64)

    def update(self, slots: np.ndarray, x: Tensor, x_hat: Tensor) -> None:
        diff = (x.detach().cpu().double() - x_hat.detach().cpu().double()) * self.inv
        self.err.index_add_(0, torch.from_numpy(slots), diff.pow(2).sum(-1))


def reconstruction_replicates(
    counts: np.ndarray, moments: LayerMoments, columns: Tensor, err: Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """FVU and MSE (means over the variant's layers, as in ``reconstruction``) of each
    replicate; ``columns`` picks the variant's layers out of the shared moments.

    The variance is taken around the full data's mean, not each replicate's: around its
    own mean, a replicate's variance shrinks by the spread of document means it no longer
    sees (duplicated documents), which biased every resampled FVU upward, past the spread
    itself for an untrained coder (smoke control: FVU 1.001, all 200 replicates above)."""
    w = torch.from_numpy(counts).double()
    n = w @ moments.count  # [B]
    mean = moments.sum[:, columns].sum(0) / moments.count.sum()  # [L, d], around the shift
    s = torch.einsum("bn,nld->bl", w, moments.sum[:, columns] * mean)
    q = w @ moments.sum_sq[:, columns]
    e = w @ err
    variance = q - 2 * s + n[:, None] * mean.pow(2).sum(-1)
    fvu = (e / variance.clamp_min(1e-30)).mean(-1)
    mse = (e / (n[:, None] * moments.sum.shape[-1])).mean(-1)
    return fvu.numpy(), mse.numpy()


def ratio_mean_replicates(counts: np.ndarray, num: Tensor, den: Tensor) -> np.ndarray:
    """Per replicate: the mean over latents of ``sum num / sum den`` (latents with a zero
    denominator left out), as ``coherence.weighted_mean`` computes the full-data N_eff."""
    w = torch.from_numpy(counts).double()
    top, bottom = w @ num, w @ den
    per_latent = torch.where(bottom > 0, top / bottom.clamp_min(1e-30), torch.nan).numpy()
    defined = np.isfinite(per_latent)
    sums = np.where(defined, per_latent, 0.0).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / defined.sum(-1)


def count_interval(flags: list[bool], n_boot: int = N_BOOT, seed: int = 0) -> list[float] | None:
    """Interval of a count over a random sample of latents (the coherent count), by
    resampling the sampled latents."""
    if not flags:
        return None
    flags_arr = np.asarray(flags, dtype=float)
    draws = np.random.default_rng(seed).integers(0, flags_arr.size, size=(n_boot, flags_arr.size))
    return interval(flags_arr[draws].sum(-1), n_units=flags_arr.size, estimate=flags_arr.sum())


@dataclass(frozen=True)
class ProbeReplicates:
    f1: np.ndarray  # [B] mean over concepts of one task family (NaN where none was usable)
    topk_changed: float  # share of (replicate, concept) fits whose top-k set differs
    fits: int


def weighted_logistic(
    a: Tensor, y: Tensor, s: Tensor, C: float = 1.0, iterations: int = 50
) -> tuple[Tensor, Tensor]:
    """Batched L2 logistic regression (``probing.fit_predict``'s objective: penalty
    ``||w||^2 / 2``, loss times ``C``, free intercept) of ``[B, n, k]`` features with sample
    weights ``s`` ``[B, n]`` (a weight of 2 is a duplicated row), by damped Newton steps.
    Returns ``(w [B, k], b [B])``; ``tests/test_eval_trust.py`` checks it against sklearn."""
    B, _, k = a.shape
    xa = torch.cat([a, torch.ones_like(a[..., :1])], -1)  # [B, n, k + 1]
    theta = torch.zeros(B, k + 1, dtype=a.dtype)
    ridge = torch.full((k + 1,), 1.0 / C, dtype=a.dtype)
    ridge[-1] = 1e-12  # the intercept is not penalised (a tiny term keeps H invertible)

    def objective(t: Tensor) -> Tensor:
        z = torch.einsum("bnk,bk->bn", xa, t)
        loss = torch.nn.functional.softplus(z) - y * z
        return (s * loss).sum(-1) + 0.5 * (t[:, :-1] ** 2).sum(-1) / C

    current = objective(theta)
    for _ in range(iterations):
        p = torch.sigmoid(torch.einsum("bnk,bk->bn", xa, theta))
        grad = torch.einsum("bnk,bn->bk", xa, s * (p - y)) + theta * ridge
        hess = torch.einsum("bnk,bn,bnj->bkj", xa, s * p * (1 - p), xa) + torch.diag(ridge)
        step = torch.linalg.solve(hess, grad.unsqueeze(-1)).squeeze(-1)
        accepted = torch.zeros(B, dtype=torch.bool)
        for size in (1.0, 0.5, 0.25, 0.125, 0.0625):
            trial = theta - size * step
            value = objective(trial)
            better = ~accepted & (value <= current)
            theta = torch.where(better[:, None], trial, theta)
            current = torch.where(better, value, current)
            accepted |= better
        if float(grad.abs().max()) < 1e-10:
            break
    return theta[:, :-1], theta[:, -1]


def _standardised(train: Tensor, test: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """StandardScaler with sample weights: weighted mean and population sd; sd 0 -> 1."""
    total = s.sum(-1, keepdim=True)[..., None]
    mean = (s[..., None] * train).sum(1, keepdim=True) / total
    var = (s[..., None] * (train - mean) ** 2).sum(1, keepdim=True) / total
    sd = torch.where(var > 0, var.sqrt(), torch.ones_like(var))
    return (train - mean) / sd, (test - mean) / sd


def _dense_columns(X, cols: np.ndarray) -> Tensor:
    """``X[:, cols[b]]`` for every replicate ``b``: ``[B, n, k]`` float64."""
    taken = X[:, cols.ravel()]
    taken = taken.toarray() if sparse.issparse(taken) else np.asarray(taken)
    return torch.from_numpy(taken.reshape(X.shape[0], *cols.shape).astype(np.float64)).transpose(
        0, 1
    )


def _top_columns(X, y: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """Per replicate, the k features with the largest weighted ``|mean(pos) - mean(neg)|``
    (``probing.rank_features`` with each row counted as often as it was drawn)."""
    gaps = []
    for side in (y, ~y):
        ws = w * side
        sums = np.asarray((X.T @ ws.T).T)  # [B, features]; X may be scipy-sparse
        gaps.append(sums / ws.sum(-1, keepdims=True))
    return np.argsort(-np.abs(gaps[0] - gaps[1]), axis=-1, kind="stable")[:, :k]


def _weighted_f1(y: np.ndarray, pred: np.ndarray, w: np.ndarray) -> np.ndarray:
    tp = (w * (pred & y)).sum(-1)
    wrong = (w * (pred != y)).sum(-1)
    denominator = 2 * tp + wrong
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1e-30), 0.0)


def probe_replicates(
    X,
    index: np.ndarray,
    splits: dict[str, ProbeSplit],
    slots_of: Callable[[np.ndarray], np.ndarray],
    counts: np.ndarray,
    k: int,
    C: float = 1.0,
    first_is_full: bool = False,
) -> ProbeReplicates:
    """Refit every concept's k-latent probe inside each replicate: each example weighs as
    often as its document was drawn (as if repeated), latents are re-ranked on that train
    side, test F1 is weighted the same way. ``slots_of`` maps example ids to document slots.
    All replicates of a concept are fitted at once (``weighted_logistic``)."""
    n_boot = counts.shape[0]
    per_concept, changed, fits = [], 0, 0
    for split in splits.values():
        if not split.usable():
            continue
        train, test = np.searchsorted(index, split.train), np.searchsorted(index, split.test)
        X_train, X_test = X[train], X[test]
        k_eff = min(k, X.shape[1])
        full = np.sort(rank_features(X_train, split.y_train)[:k_eff])
        w_train = counts[:, slots_of(split.train)].astype(np.float64)
        w_test = counts[:, slots_of(split.test)].astype(np.float64)
        ok = ((w_train * split.y_train).sum(-1) > 0) & ((w_train * ~split.y_train).sum(-1) > 0)
        ok &= (w_test * split.y_test).sum(-1) > 0
        f1 = np.full(n_boot, np.nan)
        if ok.any():
            w_tr, w_te = w_train[ok], w_test[ok]
            cols = _top_columns(X_train, split.y_train, w_tr, k_eff)
            counted = ok[ok] if not first_is_full else np.arange(n_boot)[ok] > 0
            changed += int(((np.sort(cols, -1) != full).any(-1) & counted).sum())
            fits += int(counted.sum())
            s = torch.from_numpy(w_tr)
            a, b = _standardised(_dense_columns(X_train, cols), _dense_columns(X_test, cols), s)
            y = torch.from_numpy(split.y_train.astype(np.float64)).expand_as(s)
            coef, intercept = weighted_logistic(a, y, s, C)
            pred = (torch.einsum("bnk,bk->bn", b, coef) + intercept[:, None] > 0).numpy()
            f1[ok] = _weighted_f1(split.y_test, pred, w_te)
        per_concept.append(f1)
    if not per_concept:
        return ProbeReplicates(np.full(n_boot, np.nan), float("nan"), 0)
    return ProbeReplicates(
        _nanmean(np.stack(per_concept)), changed / fits if fits else float("nan"), fits
    )


def _nanmean(stacked: np.ndarray) -> np.ndarray:
    """Mean over axis 0 of the finite entries; NaN where there are none."""
    finite = np.isfinite(stacked)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(finite, stacked, 0).sum(0) / finite.sum(0)


PROBE_K = 5  # the experiment table's probing budget (the largest summary k <= 10)


def variant_intervals(
    res: VariantResult,
    moments: LayerMoments,
    counts: np.ndarray,
    tasks: ProbeTasks,
    documents: DocumentIndex,
    coherent: list[bool],
    seed: int = 0,
) -> dict:
    """The ``bootstrap`` record of one variant's summary row: a 95% interval for FVU, MSE,
    N_eff and probe F1 (k = PROBE_K) over documents, for the coherent count over the
    sampled latents, and how often the probe's top-k set changed. Row 0 of the replicates
    weighs every document once: the full data's figure, the estimate the BC interval needs."""
    counts = np.vstack([np.ones((1, counts.shape[1]), dtype=counts.dtype), counts])
    fvu, mse = reconstruction_replicates(counts, moments, res.variant.columns, res.doc_err)
    fc = ratio_mean_replicates(counts, *res.doc_fc)
    families = [
        probe_replicates(X, index, splits, slots_of, counts, PROBE_K, first_is_full=True)
        for X, index, splits, slots_of in (
            (res.token_features, res.token_index, tasks.token, lambda r: documents.slot[r]),
            (res.doc_features, tasks.doc_ids, tasks.sequence, documents.slots_of_docs),
        )
        if X is not None and splits
    ]
    probe = np.full(counts.shape[0], np.nan)
    if families:
        probe = _nanmean(np.stack([f.f1 for f in families]))
    fits = sum(f.fits for f in families)
    changed = sum(f.topk_changed * f.fits for f in families if f.fits)
    n = documents.n_docs

    def bc(replicates: np.ndarray) -> list[float] | None:
        return interval(replicates[1:], n_units=n, estimate=replicates[0])

    return {
        "resamples": int(counts.shape[0] - 1),
        "unit": "held-out documents",
        "n_docs": n,
        "level": LEVEL,
        "method": "bias-corrected expanded percentile",
        "fvu": bc(fvu),
        "mse": bc(mse),
        "fc": bc(fc),
        "probe_k": PROBE_K,
        "probe_f1": bc(probe),
        "probe_topk_changed": changed / fits if fits else None,
        "judge_good": count_interval(coherent, int(counts.shape[0] - 1), seed),
        "judge_good_unit": "sampled latents",
    }
