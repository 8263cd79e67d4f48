"""Gazetteer matching on a token stream, last-token labels, entity-disjoint splits."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pytest

from pipeline.evaluation.concepts import (
    Gazetteer,
    build_gazetteer,
    entity_split,
    find_token_concepts,
    match_text,
    row_classes,
    sequence_labels,
    token_classes,
)


def whitespace_tokens(text: str) -> list[str]:
    """A tokenizer stand-in: BPE-like pieces that keep their leading space; digits split in two."""
    pieces = []
    for word in re.findall(r"\s*\S+", text):
        four_digits = re.fullmatch(r"(\s*\d\d)(\d\d\W*)", word)
        pieces += list(four_digits.groups()) if four_digits else [word]  # " 1998," -> " 19", "98,"
    return pieces


def token_table(docs: list[str], bos_every: int = 0) -> pa.Table:
    """Documents packed back to back with an EOS after each, optionally a BOS every n rows."""
    texts, doc_ids, special = [], [], []
    for doc_id, text in enumerate(docs):
        for piece in whitespace_tokens(text):
            if bos_every and len(texts) % bos_every == 0:
                texts, doc_ids, special = [*texts, "<bos>"], [*doc_ids, -1], [*special, True]
            texts.append(piece)
            doc_ids.append(doc_id)
            special.append(False)
        texts.append("<eos>")
        doc_ids.append(-1)
        special.append(True)
    n = len(texts)
    return pa.table(
        {
            "token_id": pa.array(np.arange(n), pa.int32()),
            "doc_id": pa.array(doc_ids, pa.int32()),
            "position": pa.array(np.arange(n), pa.int32()),
            "token_text": pa.array(texts, pa.string()),
            "is_special": pa.array(special, pa.bool_()),
        }
    )


@pytest.fixture(scope="module")
def gazetteer() -> Gazetteer:
    return build_gazetteer()


def _labelled(table: pa.Table, concepts, concept: str) -> list[str]:
    texts = table["token_text"].to_pylist()
    return [texts[r] for r in concepts.rows_of(concept)]


def test_finds_names_years_and_labels_the_last_token(gazetteer: Gazetteer) -> None:
    docs = ["She moved from New York to Texas in 1998, then to France.", "Paris in May 2001."]
    table = token_table(docs, bos_every=5)  # a BOS lands inside the first document
    found = find_token_concepts(table, gazetteer)
    assert _labelled(table, found, "us_state") == [" York", " Texas"]
    assert _labelled(table, found, "country") == [" France."]
    assert _labelled(table, found, "year") == ["98,", "01."]
    assert _labelled(table, found, "city") == ["Paris"]
    assert _labelled(table, found, "month") == [" May"]
    entities = dict(zip(found.row.tolist(), found.entity.tolist(), strict=True))
    york_row = found.rows_of("us_state")[0]
    assert entities[york_row] == "New York"
    special = table["is_special"].to_numpy(zero_copy_only=False)
    assert not special[found.row].any()
    mask = found.labels(table.num_rows, "country")
    assert mask.sum() == 1 and mask[found.rows_of("country")[0]]


def test_match_text_word_boundaries_and_numbers(gazetteer: Gazetteer) -> None:
    hits = match_text("Texasville Frances 12,500 and 2150 and 1066", gazetteer)
    assert [(c, e) for _, _, c, e in hits] == [
        ("number", "12,500"),
        ("number", "2150"),
        ("year", "1066"),
    ]


def test_ambiguous_names_get_every_class_or_are_dropped() -> None:
    assert set(build_gazetteer().names["Georgia"]) == {"country", "us_state"}
    assert "Georgia" not in build_gazetteer(ambiguous="drop").names


def test_entity_split_is_disjoint_and_seeded() -> None:
    entities = np.array(["France", "Texas", "France", "Peru", "Texas", "Chile", "Peru", "Laos"])
    is_test = entity_split(entities, 0.5, seed=3)
    train, test = set(entities[~is_test]), set(entities[is_test])
    assert train and test and not train & test
    assert np.array_equal(is_test, entity_split(entities, 0.5, seed=3))


def test_sequence_labels_and_row_classes() -> None:
    documents = pa.table(
        {
            "doc_id": pa.array([0, 1, 2], pa.int32()),
            "title": ["a", "b", "c"],
            "language": ["en", "fr", "en"],
            "topic": ["history", "histoire", ""],
            "split": ["test", "test", "train"],
        }
    )
    ids, labels = sequence_labels(documents, "topic", language="en")
    assert ids.tolist() == [0] and labels.tolist() == ["history"]
    ids, labels = sequence_labels(documents, "language")
    table = token_table(["one two", "un deux", "x"])
    classes = row_classes(table, ids, labels)
    assert classes.tolist() == ["en", "en", "", "fr", "fr", "", "en", ""]


def test_token_classes_one_class_per_row(gazetteer: Gazetteer) -> None:
    table = token_table(["Georgia and Texas"])
    classes = token_classes(find_token_concepts(table, gazetteer), table.num_rows)
    assert classes.tolist() == ["us_state", "", "us_state", ""]


def test_real_token_table_from_build_windows(gazetteer: Gazetteer) -> None:
    """The harvest's own token table (byte-level tokenizer, BOS every 16 rows)."""
    from pipeline.harvest.text_sources import Document
    from pipeline.harvest.tiny_model import byte_level_tokenizer
    from pipeline.harvest.windows import build_windows
    from pipeline.manifests.harvest import TokenizationSpec

    docs = [
        Document("a", "Flights from New York to Texas.", "en", "travel"),
        Document("b", "France won in 1998.", "en", "sport"),
    ]
    spec = TokenizationSpec(context_length=16, num_tokens=144, test_fraction=0.5)
    table = build_windows(docs * 3, byte_level_tokenizer(), spec).tokens
    found = find_token_concepts(table, gazetteer)
    texts = table["token_text"].to_pylist()
    labelled = {(e, texts[r]) for r, e in zip(found.row, found.entity, strict=True)}
    assert {("New York", "k"), ("Texas", "s"), ("France", "e"), ("1998", "8")} <= labelled
    assert {e for e, _ in labelled} <= {"New York", "Texas", "France", "1998", "199", "19", "1"}
