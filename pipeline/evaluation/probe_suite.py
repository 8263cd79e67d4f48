"""The probing tasks of one store, and their scores for every feature set.

Token tasks: gazetteer classes (last token of each match), split by entity. Sequence
tasks: language, and topic within each language (topic names are per language), split by
document, features mean-pooled over each document's evaluated tokens. Only held-out
(test-split) rows take part; tasks without both classes on both sides are dropped and
counted. Baselines: the raw residual of each read layer (the best layer is reported) and,
for coders whose latents each own a layer (per-layer SAEs), each layer's latents alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.evaluation.concepts import (
    Gazetteer,
    TokenConcepts,
    find_token_concepts,
    sequence_labels,
)
from pipeline.evaluation.probing import (
    ProbeSplit,
    probe_all,
    sequence_split,
    token_concept_split,
)
from pipeline.evaluation.results import probe_columns
from pipeline.evaluation.run_metrics import ProbeRows, ResidualFeatures, Variant, VariantResult

TEST_FRACTION = 0.3


@dataclass(frozen=True)
class ProbeTasks:
    token: dict[str, ProbeSplit]
    sequence: dict[str, ProbeSplit]
    doc_ids: np.ndarray  # sorted pooled documents (pooled feature rows follow this order)
    doc_slot: np.ndarray  # per token row: index into doc_ids (evaluated rows only), or -1
    dropped: list[str]  # tasks without both classes on both sides
    concepts: TokenConcepts

    def rows(self) -> ProbeRows:
        wanted = [s.ids() for s in self.token.values()]
        token_rows = np.unique(np.concatenate(wanted)) if wanted else np.zeros(0)
        return ProbeRows(token_rows.astype(np.int64), self.doc_slot, self.doc_ids.size)


def build_tasks(
    tokens: pa.Table,
    documents: pa.Table,
    eval_rows: np.ndarray,
    gazetteer: Gazetteer,
    seed: int = 0,
) -> ProbeTasks:
    """Every usable token and sequence task on the evaluated rows."""
    doc_of_row = tokens["doc_id"].to_numpy().astype(np.int64)
    concepts = find_token_concepts(tokens, gazetteer)
    token, dropped = {}, []
    for concept in concepts.concepts():
        split = token_concept_split(
            concepts, concept, eval_rows, doc_of_row, TEST_FRACTION, 1.0, seed
        )
        if split.usable():
            token[concept] = split
        else:
            dropped.append(concept)
    evaluated = np.unique(doc_of_row[eval_rows])
    evaluated = evaluated[evaluated >= 0]
    sequence = {}
    doc_ids, languages = sequence_labels(documents, "language")
    keep = np.isin(doc_ids, evaluated)
    for language in sorted(set(languages[keep].tolist())):
        tasks = {f"language:{language}": (doc_ids[keep], languages[keep], language)}
        topic_ids, topics = sequence_labels(documents, "topic", language=language)
        here = np.isin(topic_ids, evaluated)
        for topic in sorted(set(topics[here].tolist())):
            tasks[f"topic:{language}:{topic}"] = (topic_ids[here], topics[here], topic)
        for name, (ids, labels, target) in tasks.items():
            split = sequence_split(ids, labels, target, TEST_FRACTION, seed=seed)
            if split.usable():
                sequence[name] = split
            else:
                dropped.append(name)
    pooled = np.unique(np.concatenate([s.ids() for s in sequence.values()] or [[]]))
    pooled = pooled.astype(np.int64)
    slots = np.full(doc_of_row.size, -1, dtype=np.int64)
    if pooled.size:
        at = np.searchsorted(pooled, doc_of_row).clip(max=pooled.size - 1)
        in_eval = np.zeros(doc_of_row.size, dtype=bool)
        in_eval[eval_rows] = True
        slots = np.where((pooled[at] == doc_of_row) & in_eval, at, -1)
    return ProbeTasks(token, sequence, pooled, slots, dropped, concepts)


def score_rows(
    label: str, task: str, X, index: np.ndarray, splits: dict[str, ProbeSplit], ks, seed: int
) -> list[dict]:
    """Long-format rows ``{features, task, concept, k, f1, accuracy, n_train, n_test}``."""
    if X is None or not splits or X.shape[1] == 0:
        return []
    return [
        {
            "features": label,
            "task": task,
            "concept": s.concept,
            "k": s.k,
            "f1": s.f1,
            "accuracy": s.accuracy,
            "n_train": s.n_train,
            "n_test": s.n_test,
        }
        for s in probe_all(X, index, splits, ks, seed=seed)
    ]


def best_of(rows: list[dict], prefix: str, task: str) -> tuple[str | None, list[dict]]:
    """The feature set under ``prefix`` with the highest mean F1 (over concepts and k)."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        if r["features"].startswith(prefix) and r["task"] == task:
            groups.setdefault(r["features"], []).append(r["f1"])
    if not groups:
        return None, []
    best = max(sorted(groups), key=lambda g: float(np.mean(groups[g])))
    return best, [r for r in rows if r["features"] == best and r["task"] == task]


def f1_by_k(rows: list[dict], features: str, task: str) -> dict[int, float]:
    """Mean F1 over concepts, per k, of one feature set on one task."""
    by_k: dict[int, list[float]] = {}
    for r in rows:
        if r["features"] == features and r["task"] == task:
            by_k.setdefault(r["k"], []).append(r["f1"])
    return {k: float(np.mean(v)) for k, v in sorted(by_k.items())}


def probe_variant(
    res: VariantResult, tasks: ProbeTasks, hooks: list[str], ks, seed: int
) -> list[dict]:
    """Every task on one variant's codes (and, for per-layer SAEs, on each layer's)."""
    name, rows = res.variant.name, []
    rows += score_rows(name, "token", res.token_features, res.token_index, tasks.token, ks, seed)
    rows += score_rows(name, "sequence", res.doc_features, tasks.doc_ids, tasks.sequence, ks, seed)
    own = res.variant.coder.latent_layer()
    if own is not None:  # per-layer SAE: each layer's latents alone (best layer is reported)
        own = own.cpu().numpy()
        for j, hook in enumerate(hooks):
            cols = np.flatnonzero(own == j)
            tok = None if res.token_features is None else res.token_features[:, cols]
            doc = None if res.doc_features is None else res.doc_features[:, cols]
            label = f"{name} @ {hook}"
            rows += score_rows(label, "token", tok, res.token_index, tasks.token, ks, seed)
            rows += score_rows(label, "sequence", doc, tasks.doc_ids, tasks.sequence, ks, seed)
    return rows


def probe_residual(residual: ResidualFeatures, tasks: ProbeTasks, ks, seed: int) -> list[dict]:
    """Every task on the raw residual of each read layer (the baseline)."""
    rows = []
    n_layers = len(residual.hooks)
    docs = residual.doc_features
    docs = None if docs is None else docs.reshape(docs.shape[0], n_layers, -1)
    for j, hook in enumerate(residual.hooks):
        label = f"residual @ {hook}"
        tok = None if residual.token_features is None else residual.token_features[:, j]
        rows += score_rows(label, "token", tok, residual.token_index, tasks.token, ks, seed)
        doc = None if docs is None else docs[:, j]
        rows += score_rows(label, "sequence", doc, tasks.doc_ids, tasks.sequence, ks, seed)
    return rows


def baseline_rows(probe_rows: list[dict], variants: list[Variant]) -> list[dict]:
    """Summary rows for the best residual layer and each per-layer SAE's best layer."""
    prefixes = {"residual": "residual @ "}
    prefixes |= {
        f"{v.name} (best layer)": f"{v.name} @ "
        for v in variants
        if v.coder.latent_layer() is not None
    }
    out = []
    for label, prefix in prefixes.items():
        by_k, chosen = {}, {}
        for task in ("token", "sequence"):
            best, _ = best_of(probe_rows, prefix, task)
            if best:
                by_k[task], chosen[task] = f1_by_k(probe_rows, best, task), best
        if by_k:
            out.append(
                {
                    "variant": label,
                    "kind": "baseline",
                    "features": chosen,
                    **probe_columns(by_k),
                }
            )
    return out
