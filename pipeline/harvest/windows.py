"""Documents -> fixed-length token windows, plus the token and document tables.

Documents are shuffled with the manifest seed, each gets a train/test split, and their
tokens are packed back to back (an EOS after each) into windows of ``context_length``
that start with BOS. BOS and EOS rows are flagged ``is_special`` so that training and
metrics skip them; every other row belongs to exactly one document. Tokenisation is one
batched tokenizer call per ``TOKENIZE_BATCH`` documents, with character offsets, so each
row's ``token_text`` is its whole-character slice of the document (``token_text.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.harvest.text_sources import Document
from pipeline.harvest.token_text import decode_pieces, tokenize_with_pieces
from pipeline.manifests.harvest import TokenizationSpec

TOKENIZE_BATCH = 256


class CorpusTooSmallError(ValueError):
    pass


@dataclass(frozen=True)
class TokenWindows:
    token_ids: np.ndarray  # [n_windows, context_length] int32
    tokens: pa.Table  # one row per token
    documents: pa.Table  # one row per document that contributed tokens

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.size)


def _special_id(tokenizer, attribute: str) -> int:
    value = getattr(tokenizer, attribute, None)
    if value is None:
        value = tokenizer.eos_token_id if attribute == "bos_token_id" else tokenizer.bos_token_id
    if value is None:
        raise ValueError(f"the tokenizer has neither a BOS nor an EOS token ({attribute})")
    return int(value)


def _encode(tokenizer, batch: list[Document]) -> tuple[list[list[int]], list[list[str]]]:
    """Ids and text pieces of a batch: one batched tokenizer call for the raw texts,
    incremental decoding for documents that arrive pre-tokenised."""
    raw = [i for i, d in enumerate(batch) if d.token_ids is None]
    ids: list[list[int]] = [[] for _ in batch]
    pieces: list[list[str]] = [[] for _ in batch]
    if raw:
        raw_ids, raw_pieces = tokenize_with_pieces(tokenizer, [batch[i].text for i in raw])
        for i, doc_ids, doc_pieces in zip(raw, raw_ids, raw_pieces, strict=True):
            ids[i], pieces[i] = doc_ids, doc_pieces
    for i, doc in enumerate(batch):
        if doc.token_ids is not None:
            ids[i] = list(doc.token_ids)
            pieces[i] = decode_pieces(tokenizer.decode, ids[i])
    return ids, pieces


def _total_with_bos(stream: np.ndarray, ctx: int, prepend_bos: bool) -> np.ndarray:
    """Rows taken once ``stream`` tokens are packed (one BOS opens every window)."""
    return stream + -(-stream // (ctx - 1)) if prepend_bos else stream


def build_windows(documents: list[Document], tokenizer, spec: TokenizationSpec) -> TokenWindows:
    rng = np.random.default_rng(spec.seed)
    order = rng.permutation(len(documents))
    is_test = rng.random(len(documents)) < spec.test_fraction
    bos, eos = _special_id(tokenizer, "bos_token_id"), _special_id(tokenizer, "eos_token_id")
    ctx, n = spec.context_length, spec.num_tokens
    bos_text, eos_text = tokenizer.decode([bos]), tokenizer.decode([eos])

    # Tokenise whole batches until the packed stream (each document + EOS) fills n rows.
    ids: list[np.ndarray] = []
    texts: list[str] = []
    lengths: list[int] = []
    cursor, used = 0, None
    while used is None:
        if cursor >= len(order):
            held = int(_total_with_bos(np.asarray(sum(lengths)), ctx, spec.prepend_bos))
            raise CorpusTooSmallError(
                f"tokenization.num_tokens: asked for {n} tokens but the text "
                f"source holds only {held}"
            )
        batch = [documents[i] for i in order[cursor : cursor + TOKENIZE_BATCH]]
        batch_ids, batch_pieces = _encode(tokenizer, batch)
        for doc_ids, doc_pieces in zip(batch_ids, batch_pieces, strict=True):
            ids.append(np.asarray([*doc_ids, eos], dtype=np.int64))
            texts += [*doc_pieces, eos_text]
            lengths.append(len(doc_ids) + 1)
        totals = _total_with_bos(np.cumsum(lengths), ctx, spec.prepend_bos)
        full = np.flatnonzero(totals >= n)
        used = int(full[0]) + 1 if full.size else None
        cursor += len(batch)

    stream_ids = np.concatenate(ids[:used])
    stream_docs = np.repeat(np.arange(used, dtype=np.int64), lengths[:used])
    stream_special = np.zeros(stream_ids.size, dtype=bool)
    ends = np.cumsum(lengths[:used]) - 1
    stream_docs[ends], stream_special[ends] = -1, True  # the EOS closing each document
    stream_text = np.asarray(texts[: stream_ids.size], dtype=object)
    n_windows = n // ctx
    if spec.prepend_bos:
        body = n_windows * (ctx - 1)

        def pack(stream: np.ndarray, first) -> np.ndarray:
            grid = stream[:body].reshape(n_windows, ctx - 1)
            head = np.full((n_windows, 1), first, dtype=stream.dtype)
            return np.concatenate([head, grid], axis=1).reshape(-1)

        token_ids = pack(stream_ids, bos)
        doc_ids = pack(stream_docs, -1)
        special = pack(stream_special, True)
        token_text = pack(stream_text, bos_text)
    else:
        token_ids, doc_ids = stream_ids[:n], stream_docs[:n]
        special, token_text = stream_special[:n], stream_text[:n]
    positions = np.tile(np.arange(ctx, dtype=np.int32), n_windows)

    tokens = pa.table(
        {
            "token_id": token_ids.astype(np.int32),
            "doc_id": doc_ids.astype(np.int32),
            "position": positions,
            "token_text": pa.array(token_text.tolist(), pa.string()),
            "is_special": special.astype(bool),
        }
    )
    kept = [documents[i] for i in order[:used]]
    documents_table = pa.table(
        {
            "doc_id": np.arange(used, dtype=np.int32),
            "title": [d.title for d in kept],
            "language": [d.language for d in kept],
            "topic": [d.topic for d in kept],
            "split": ["test" if t else "train" for t in is_test[order[:used]]],
        }
    )
    return TokenWindows(token_ids.astype(np.int32).reshape(-1, ctx), tokens, documents_table)
