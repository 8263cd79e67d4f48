"""Per-token text that keeps multi-byte characters whole.

Byte-level tokenizers split one character (é, 日, an emoji) over several tokens; decoding
each token alone gives U+FFFD for every piece. Here each token's text is its slice of the
document: from where the previous token's text ended to where its own span ends (the
tokenizer's character offsets). A character shared by several tokens goes, whole, to the
last of them (the one that completes it); the others get "". Joining a document's pieces
gives back its text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


def pieces_from_offsets(text: str, offsets: Sequence[tuple[int, int]]) -> list[str]:
    """One piece of ``text`` per token, from the tokenizer's ``(start, end)`` offsets."""
    pieces, done = [], 0
    for i, (_, end) in enumerate(offsets):
        if i + 1 < len(offsets) and offsets[i + 1][0] < end:
            pieces.append("")  # the next token shares this character: it ends it
            continue
        stop = max(int(end), done)
        pieces.append(text[done:stop])
        done = stop
    if pieces and done < len(text):  # text the tokenizer dropped at the end (whitespace)
        pieces[-1] += text[done:]
    return pieces


def decode_pieces(decode: Callable[[list[int]], str], ids: Sequence[int]) -> list[str]:
    """Pieces of a token sequence without its source text (stores built before offsets,
    slow tokenizers, pre-tokenised data): each token gets what it adds to the decoded text
    of the token before it, and "" while a character is still missing bytes (incremental
    detokenisation, linear in ``len(ids)``)."""
    ids = [int(i) for i in ids]
    pieces: list[str] = []
    prefix_start = read_start = 0
    for i in range(len(ids)):
        prefix = decode(ids[prefix_start:read_start])
        full = decode(ids[prefix_start : i + 1])
        if full.endswith(REPLACEMENT) and i + 1 < len(ids):
            pieces.append("")  # wait for the character's last byte
            continue
        pieces.append(full[len(prefix) :])
        prefix_start, read_start = read_start, i + 1
    return pieces


def tokenize_with_pieces(tokenizer, texts: list[str]) -> tuple[list[list[int]], list[list[str]]]:
    """Token ids and their text pieces for a batch of documents, in one tokenizer call."""
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        ids = [list(map(int, row)) for row in encoded["input_ids"]]
        pieces = [
            pieces_from_offsets(text, offsets)
            for text, offsets in zip(texts, encoded["offset_mapping"], strict=True)
        ]
        return ids, pieces
    ids = [list(map(int, row)) for row in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return ids, [decode_pieces(tokenizer.decode, row) for row in ids]
