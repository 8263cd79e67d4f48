"""One-vs-rest sparse probing (Gurnee et al.; SAEBench): can k latents find a concept?

Latents are ranked on train by ``|mean(pos) - mean(neg)|`` after folding each latent's total
decoder norm into its activation (a latent with a tiny decoder can have huge activations);
the top k feed an L2 logistic regression, scored by test F1 and accuracy. Token concepts
split by entity, sequence tasks by document; both balanced by default. The raw residual
of one layer is the baseline: its d dims stand in for latents, one call per layer.
The features themselves come from the evaluation pass (``run_metrics``): only the rows
the probes need, sparse for codes, and per-document means for the sequence tasks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor

from pipeline.coders.base import Coder
from pipeline.evaluation.concepts import TokenConcepts, entity_split

DEFAULT_KS = (1, 2, 5, 10, 20, 50, 100)


@dataclass(frozen=True)
class ProbeSplit:
    """Example ids (token rows or doc ids) and binary labels on each side."""

    train: np.ndarray
    y_train: np.ndarray
    test: np.ndarray
    y_test: np.ndarray

    def ids(self) -> np.ndarray:
        return np.concatenate([self.train, self.test])

    def usable(self) -> bool:
        """Both classes on both sides (a rare concept may have too few entities)."""
        return all(y.any() and not y.all() for y in (self.y_train, self.y_test))


def _take(ids: np.ndarray, n: int | None, rng: np.random.Generator) -> np.ndarray:
    if n is None or n >= ids.size:
        return np.sort(ids)
    return np.sort(rng.choice(ids, size=n, replace=False))


def _side(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = np.concatenate([pos, neg])
    return ids, np.concatenate([np.ones(pos.size, bool), np.zeros(neg.size, bool)])


def token_concept_split(
    concepts: TokenConcepts,
    concept: str,
    candidates: np.ndarray,
    doc_of_row: np.ndarray,
    test_fraction: float = 0.3,
    neg_per_pos: float | None = 1.0,
    seed: int = 0,
) -> ProbeSplit:
    """Positives split by entity (none on both sides), negatives by document, then sampled
    at ``neg_per_pos`` negatives per positive (None keeps every negative)."""
    rng = np.random.default_rng(seed)
    candidates = np.unique(candidates)
    keep = np.isin(concepts.row, candidates) & (concepts.concept == concept)
    rows, entities = concepts.row[keep], concepts.entity[keep]
    is_test = entity_split(entities, test_fraction, seed)
    negatives = np.setdiff1d(candidates, rows)
    docs = np.unique(doc_of_row[negatives])
    test_docs = rng.permutation(docs)[: round(test_fraction * docs.size)]
    neg_test = np.isin(doc_of_row[negatives], test_docs)
    sides = []
    for pos, neg in ((rows[~is_test], negatives[~neg_test]), (rows[is_test], negatives[neg_test])):
        pos = np.unique(pos)
        n_neg = None if neg_per_pos is None else round(neg_per_pos * pos.size)
        sides.append(_side(pos, _take(neg, n_neg, rng)))
    return ProbeSplit(*sides[0], *sides[1])


def sequence_split(
    doc_ids: np.ndarray,
    labels: np.ndarray,
    target: str,
    test_fraction: float = 0.3,
    max_per_class: int | None = None,
    seed: int = 0,
) -> ProbeSplit:
    """Balanced documents: as many of other classes as of ``target``, split by document."""
    rng = np.random.default_rng(seed)
    pos, neg = doc_ids[labels == target], doc_ids[labels != target]
    n = min(pos.size, neg.size, max_per_class or pos.size)
    pos, neg = rng.permutation(pos)[:n], rng.permutation(neg)[:n]
    n_test = round(test_fraction * n)
    train = _side(np.sort(pos[n_test:]), np.sort(neg[n_test:]))
    test = _side(np.sort(pos[:n_test]), np.sort(neg[:n_test]))
    return ProbeSplit(*train, *test)


def decoder_norm_weights(coder: Coder, scale: Tensor | None = None) -> Tensor:
    """Per latent, ``sum_l ||W_dec[i, l]||`` (raw units when ``scale`` is given)."""
    with torch.no_grad():
        norms = coder.decoder_norms().detach().float()
        if scale is not None:
            norms = norms / scale.to(norms).view(1, -1)
        return norms.sum(-1)


def rank_features(X: sparse.spmatrix | np.ndarray, y: np.ndarray) -> np.ndarray:
    """Feature indices, best first, by ``|mean(pos) - mean(neg)|``."""
    gap = np.asarray(X[y].mean(0)).ravel() - np.asarray(X[~y].mean(0)).ravel()
    return np.argsort(-np.abs(gap), kind="stable")


def fit_predict(
    a, y: np.ndarray, b, C: float = 1.0, standardize: bool = True, seed: int = 0
) -> np.ndarray:
    """The probe: an L2 logistic regression on ``a`` (standardised), predicting ``b``."""
    a, b = (a.toarray(), b.toarray()) if sparse.issparse(a) else (a, b)
    model = LogisticRegression(C=C, max_iter=2000, random_state=seed)
    clf = make_pipeline(StandardScaler(), model) if standardize else model
    return clf.fit(a, y).predict(b)


@dataclass(frozen=True)
class ProbeScore:
    concept: str
    k: int
    f1: float
    accuracy: float
    n_train: int
    n_test: int
    features: np.ndarray  # the k features used


def probe_concept(
    X: sparse.spmatrix | np.ndarray,
    index: np.ndarray,
    split: ProbeSplit,
    concept: str,
    ks: Iterable[int] = DEFAULT_KS,
    C: float = 1.0,
    standardize: bool = True,
    seed: int = 0,
) -> list[ProbeScore]:
    """Rank on train, fit on the top k, score on test, for each k (capped at #features)."""
    train, test = np.searchsorted(index, split.train), np.searchsorted(index, split.test)
    if not split.usable():
        raise ValueError(f"probe_concept({concept!r}): train and test each need both classes")
    X_train, X_test = X[train], X[test]
    order = rank_features(X_train, split.y_train)
    scores = []
    for k in sorted({min(k, X.shape[1]) for k in ks}):
        cols = order[:k]
        pred = fit_predict(X_train[:, cols], split.y_train, X_test[:, cols], C, standardize, seed)
        f1 = f1_score(split.y_test, pred, zero_division=0.0)
        acc = accuracy_score(split.y_test, pred)
        scores.append(ProbeScore(concept, k, float(f1), float(acc), train.size, test.size, cols))
    return scores


def probe_all(
    X: sparse.spmatrix | np.ndarray,
    index: np.ndarray,
    splits: dict[str, ProbeSplit],
    ks: Iterable[int] = DEFAULT_KS,
    **kwargs: Any,
) -> list[ProbeScore]:
    """Every usable concept's probes against one feature matrix; unusable splits are skipped."""
    ks = tuple(ks)
    splits = {c: s for c, s in splits.items() if s.usable()}
    return [
        s for c, split in splits.items() for s in probe_concept(X, index, split, c, ks, **kwargs)
    ]
