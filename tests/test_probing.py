"""Sparse probing end to end on synthetic activations with a planted concept direction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.evaluation.concepts import TokenConcepts
from pipeline.evaluation.probing import (
    ProbeSplit,
    coder_features,
    collect_rows,
    decoder_norm_weights,
    mean_f1_by_k,
    pool_documents,
    probe_all,
    probe_concept,
    rank_features,
    residual_features,
    sequence_split,
    token_concept_split,
)
from tests.test_reconstruction_metrics import LinearReluCoder

L, D, M, N = 2, 16, 64, 6000
TOKENS_PER_DOC = 20


@pytest.fixture(scope="module")
def world() -> dict:
    """Tokens in documents; 'planted' tokens carry a direction on layer 1, 'random' do not."""
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    x = torch.randn(N, L, D, generator=g)
    planted = rng.random(N) < 0.1
    direction = torch.randn(D, generator=g)
    x[torch.from_numpy(planted), 1] += 5.0 * direction / direction.norm()
    doc_of_row = np.arange(N) // TOKENS_PER_DOC
    n_docs = doc_of_row.max() + 1
    topic = np.where(rng.random(n_docs) < 0.5, "sport", "music")
    sport = torch.from_numpy(topic[doc_of_row] == "sport")
    x[sport, 0] += 1.0 * torch.eye(D)[3]  # a weak per-token topic signal, clear when pooled
    w_enc = torch.randn(L, D, M, generator=g) / D**0.5
    coder = LinearReluCoder(w_enc, torch.randn(M, L, D, generator=g))
    random_rows = np.flatnonzero(rng.random(N) < 0.1)
    rows = np.concatenate([np.flatnonzero(planted), random_rows])
    entities = np.asarray([f"e{r % 37}" for r in rows], dtype=object)
    concepts = TokenConcepts(
        rows.astype(np.int64),
        np.asarray(["planted"] * planted.sum() + ["random"] * random_rows.size, dtype=object),
        entities,
    )
    return {"x": x, "doc": doc_of_row, "coder": coder, "concepts": concepts, "topic": topic}


def _batches(x: torch.Tensor, size: int = 512):
    return [(np.arange(s, min(s + size, len(x))), x[s : s + size]) for s in range(0, len(x), size)]


def _token_splits(world: dict) -> dict[str, ProbeSplit]:
    everything = np.arange(N)
    return {
        c: token_concept_split(world["concepts"], c, everything, world["doc"], seed=1)
        for c in ("planted", "random")
    }


def test_token_split_is_entity_disjoint_and_balanced(world: dict) -> None:
    split = _token_splits(world)["planted"]
    entity = dict(
        zip(world["concepts"].row.tolist(), world["concepts"].entity.tolist(), strict=True)
    )
    train = {entity[r] for r in split.train[split.y_train]}
    test = {entity[r] for r in split.test[split.y_test]}
    assert train and test and not train & test
    assert split.y_train.sum() == (~split.y_train).sum()
    assert not set(split.train) & set(split.test)


def test_planted_concept_is_found_and_random_is_chance(world: dict) -> None:
    splits = _token_splits(world)
    rows = np.concatenate([s.ids() for s in splits.values()])
    X, index = collect_rows(_batches(world["x"]), rows, coder_features(world["coder"]))
    scores = probe_all(X, index, splits, ks=(1, 5, 20))
    by = {(s.concept, s.k): s for s in scores}
    assert by["planted", 20].f1 > 0.9 and by["planted", 20].accuracy > 0.9
    assert 0.3 < by["random", 20].f1 < 0.7
    assert set(mean_f1_by_k(scores)) == {1, 5, 20}


def test_residual_baseline_per_layer(world: dict) -> None:
    split = _token_splits(world)["planted"]
    f1 = {}
    for layer in range(L):
        X, index = collect_rows(
            _batches(world["x"]), split.ids(), residual_features(layer), as_sparse=False
        )
        f1[layer] = probe_concept(X, index, split, "planted", ks=(D,))[0].f1
    assert f1[1] > 0.9 and f1[0] < 0.7  # the caller picks the best layer


def test_sequence_probe_on_pooled_codes(world: dict) -> None:
    doc_ids = np.unique(world["doc"])
    split = sequence_split(doc_ids, world["topic"], "sport", seed=0)
    assert split.y_train.sum() == (~split.y_train).sum()
    assert not set(split.train) & set(split.test)
    pooled = pool_documents(_batches(world["x"]), world["doc"], doc_ids, residual_features(0))
    score = probe_concept(pooled, doc_ids, split, "sport", ks=(1,))[0]
    assert score.f1 > 0.9
    assert score.features.tolist() == [3]


def test_unusable_splits_are_skipped(world: dict) -> None:
    splits = _token_splits(world)
    empty = np.zeros(0, dtype=np.int64)
    splits["rare"] = ProbeSplit(
        splits["planted"].train, splits["planted"].y_train, empty, empty > 0
    )
    rows = np.concatenate([s.ids() for s in splits.values()])
    X, index = collect_rows(_batches(world["x"]), rows, residual_features(1), as_sparse=False)
    assert {s.concept for s in probe_all(X, index, splits, ks=(2,))} == {"planted", "random"}
    with pytest.raises(ValueError, match="both classes"):
        probe_concept(X, index, splits["rare"], "rare")


def test_rank_features_on_sparse_and_dense() -> None:
    X = np.zeros((6, 3), dtype=np.float32)
    X[:3, 2] = 5.0
    X[:3, 0] = 1.0
    y = np.array([True] * 3 + [False] * 3)
    from scipy import sparse

    assert rank_features(X, y).tolist() == [2, 0, 1]
    assert rank_features(sparse.csr_matrix(X), y).tolist() == [2, 0, 1]


def test_decoder_norms_are_folded_into_codes() -> None:
    w_enc = torch.ones(1, 1, 2)
    w_dec = torch.tensor([[[1.0]], [[10.0]]])
    coder = LinearReluCoder(w_enc, w_dec)
    assert decoder_norm_weights(coder).tolist() == [1.0, 10.0]
    assert decoder_norm_weights(coder, torch.tensor([2.0])).tolist() == [0.5, 5.0]
    f = coder_features(coder)(torch.ones(1, 1, 1))
    assert f.tolist() == [[1.0, 10.0]]


def test_collect_rows_orders_by_row_and_reports_missing(world: dict) -> None:
    X, index = collect_rows(_batches(world["x"][:100], 7), np.array([50, 3, 99]), lambda x: x[:, 0])
    assert index.tolist() == [3, 50, 99]
    assert np.allclose(X.toarray()[1], world["x"][50, 0].numpy())
    with pytest.raises(ValueError, match="never appeared"):
        collect_rows(_batches(world["x"][:10]), np.array([20]), lambda x: x[:, 0])
