"""Token text keeps multi-byte characters whole, from offsets and from ids alone."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.harvest.text_sources import Document
from pipeline.harvest.tiny_model import byte_level_tokenizer
from pipeline.harvest.token_text import decode_pieces, pieces_from_offsets, tokenize_with_pieces
from pipeline.harvest.windows import build_windows
from pipeline.manifests.harvest import TokenizationSpec

TEXTS = ["café — naïve  x 日本語 😀 ", "The  cat\n\nsat.", "Zürich, Ελλάδα"]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()  # one token per byte: every non-ASCII character is split


def test_pieces_rebuild_each_text_with_no_broken_character(tokenizer):
    ids, pieces = tokenize_with_pieces(tokenizer, TEXTS)
    for text, doc_ids, doc_pieces in zip(TEXTS, ids, pieces, strict=True):
        assert len(doc_pieces) == len(doc_ids)
        assert "".join(doc_pieces) == text
        assert "\ufffd" not in "".join(doc_pieces)
    assert {"日", "😀"} <= set(pieces[0])
    per_token = [tokenizer.decode([i]) for i in ids[0]]
    assert any("\ufffd" in p for p in per_token), "the old per-token decode does split them"


def test_decoding_ids_alone_gives_the_same_pieces(tokenizer):
    ids, pieces = tokenize_with_pieces(tokenizer, TEXTS)
    for doc_ids, doc_pieces in zip(ids, pieces, strict=True):
        assert decode_pieces(tokenizer.decode, doc_ids) == doc_pieces


def test_overlapping_offsets_give_the_character_to_the_last_token():
    assert pieces_from_offsets("aé b", [(0, 1), (1, 2), (1, 2), (2, 4)]) == ["a", "", "é", " b"]


def test_windows_keep_characters_whole_and_tokens_unchanged(tokenizer):
    docs = [Document(f"d{i}", TEXTS[i % 3] * 3) for i in range(12)]
    docs.append(Document("pre", "", token_ids=tuple(tokenizer("Ελλάδα é")["input_ids"])))
    spec = TokenizationSpec(context_length=16, num_tokens=16 * 20, test_fraction=0.5)
    windows = build_windows(docs, tokenizer, spec)
    table = windows.tokens.to_pydict()
    assert not any("\ufffd" in text for text in table["token_text"])
    ids = np.asarray(table["token_id"])
    assert np.array_equal(ids.reshape(-1, 16), windows.token_ids)
    assert (ids[np.asarray(table["position"]) == 0] == tokenizer.bos_token_id).all()
    docs_col = np.asarray(table["doc_id"])
    for doc in set(docs_col[docs_col >= 0].tolist()):
        rows = np.flatnonzero(docs_col == doc)
        text = "".join(table["token_text"][r] for r in rows)
        # the last document may be cut inside a character: its text just stops earlier
        assert text == tokenizer.decode(ids[rows].tolist()).rstrip("\ufffd")


def test_old_store_windows_decode_whole_characters_at_their_edges(tokenizer):
    """A store whose token_text was decoded token by token (U+FFFD pieces) still shows
    whole characters when the view can decode ids, even for windows cut mid-character."""
    import pyarrow as pa

    from pipeline.evaluation.top_contexts import TokenView

    text = "Zürich 日本 Ελλάδα"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    table = pa.table(
        {
            "token_id": ids,
            "doc_id": [0] * len(ids),
            "position": list(range(len(ids))),
            "token_text": [tokenizer.decode([i]) for i in ids],  # the old, broken text
            "is_special": [False] * len(ids),
        }
    )
    assert TokenView.from_table(table).texts(np.arange(len(ids)))[2] == "\ufffd"
    view = TokenView.from_table(table, lambda: tokenizer.decode)
    assert "".join(view.texts(np.arange(len(ids)))) == text
    for lo in range(len(ids)):
        for hi in range(lo, len(ids)):
            shown = "".join(view.texts(np.arange(lo, hi + 1)))
            assert "\ufffd" not in shown and shown in text, (lo, hi, shown)
