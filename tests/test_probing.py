"""Sparse probing end to end on synthetic activations with a planted concept direction.

Features come from the production pass (``run_metrics.stream_pass``: codes with decoder
norms folded in, raw residuals, per-document means), fed by an in-memory loader."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.evaluation.concepts import TokenConcepts
from pipeline.evaluation.probe_suite import f1_by_k, score_rows
from pipeline.evaluation.probing import (
    ProbeSplit,
    decoder_norm_weights,
    probe_all,
    probe_concept,
    rank_features,
    sequence_split,
    token_concept_split,
)
from pipeline.evaluation.run_metrics import (
    PassResult,
    ProbeRows,
    Variant,
    stream_pass,
    union_layers,
)
from pipeline.training.loader import Normaliser
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


@dataclass
class ArrayLoader:
    """What ``stream_pass`` reads from an ``ActivationLoader``, over an in-memory ``x``."""

    x: torch.Tensor
    size: int = 512

    @property
    def n_tokens(self) -> int:
        return len(self.x)

    @property
    def layers(self) -> list[int]:
        return list(range(self.x.shape[1]))

    @property
    def store(self) -> SimpleNamespace:
        return SimpleNamespace(hook_names=[f"h{i}" for i in self.layers])

    def raw_batches(self):
        for s in range(0, len(self.x), self.size):
            yield np.arange(s, min(s + self.size, len(self.x))), self.x[s : s + self.size]


def production_pass(
    x: torch.Tensor,
    coder,
    token_rows: np.ndarray,
    doc_of_row: np.ndarray | None = None,
    doc_ids: np.ndarray | None = None,
    size: int = 512,
) -> PassResult:
    """The evaluation pass with identity normalisation, gathering the probe rows/documents."""
    slots = np.full(len(x), -1, dtype=np.int64)
    n_docs = 0
    if doc_ids is not None:
        n_docs = doc_ids.size
        at = np.searchsorted(doc_ids, doc_of_row).clip(max=n_docs - 1)
        slots = np.where(doc_ids[at] == doc_of_row, at, -1)
    probe = ProbeRows(np.unique(token_rows).astype(np.int64), slots, n_docs)
    layers = list(range(x.shape[1]))
    identity = Normaliser(torch.zeros(x.shape[1], x.shape[2]), torch.ones(x.shape[1]), False)
    variant = Variant("c", "c", Path("."), coder, layers, identity, 0, "test")
    union_layers([variant])
    return stream_pass(
        ArrayLoader(x, size), [variant], probe, masking_tokens=0, progress=False, batch_size=size
    )


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
    result = production_pass(world["x"], world["coder"], rows).variants[0]
    X, index = result.token_features, result.token_index
    assert index.tolist() == np.unique(rows).tolist()
    scores = probe_all(X, index, splits, ks=(1, 5, 20))
    by = {(s.concept, s.k): s for s in scores}
    assert by["planted", 20].f1 > 0.9 and by["planted", 20].accuracy > 0.9
    assert 0.3 < by["random", 20].f1 < 0.7
    rows_out = score_rows("coder", "token", X, index, splits, (1, 5, 20), seed=0)
    by_k = f1_by_k(rows_out, "coder", "token")
    assert set(by_k) == {1, 5, 20}
    assert by_k[20] == pytest.approx((by["planted", 20].f1 + by["random", 20].f1) / 2)


def test_residual_baseline_per_layer(world: dict) -> None:
    split = _token_splits(world)["planted"]
    residual = production_pass(world["x"], world["coder"], split.ids()).residual
    f1 = {}
    for layer in range(L):
        X, index = residual.token_features[:, layer], residual.token_index
        f1[layer] = probe_concept(X, index, split, "planted", ks=(D,))[0].f1
    assert f1[1] > 0.9 and f1[0] < 0.7  # the caller picks the best layer


def test_sequence_probe_on_pooled_codes(world: dict) -> None:
    doc_ids = np.unique(world["doc"])
    split = sequence_split(doc_ids, world["topic"], "sport", seed=0)
    assert split.y_train.sum() == (~split.y_train).sum()
    assert not set(split.train) & set(split.test)
    passed = production_pass(world["x"], world["coder"], np.zeros(0), world["doc"], doc_ids)
    docs = passed.residual.doc_features  # [n_docs, L * d], as probe_suite reshapes it
    pooled = docs.reshape(docs.shape[0], L, D)[:, 0]
    expected = world["x"][:TOKENS_PER_DOC, 0].double().mean(0).float().numpy()
    np.testing.assert_allclose(pooled[0], expected, rtol=1e-5, atol=1e-6)
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
    residual = production_pass(world["x"], world["coder"], rows).residual
    X, index = residual.token_features[:, 1], residual.token_index
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
    result = production_pass(torch.ones(3, 1, 1), coder, np.array([1])).variants[0]
    assert result.token_features.toarray().tolist() == [[1.0, 10.0]]


def test_feature_rows_are_in_row_order_across_batches(world: dict) -> None:
    passed = production_pass(world["x"][:100], world["coder"], np.array([50, 3, 99]), size=7)
    residual = passed.residual
    assert residual.token_index.tolist() == [3, 50, 99]
    assert np.allclose(residual.token_features[1], world["x"][50].numpy())
    codes = passed.variants[0]
    assert codes.token_index.tolist() == [3, 50, 99]
    fold = decoder_norm_weights(world["coder"])
    expected = (world["coder"].encode(world["x"][[99]]) * fold).detach().numpy()
    np.testing.assert_allclose(codes.token_features.toarray()[2:], expected, rtol=1e-5, atol=1e-6)
