"""Documents -> fixed-length token windows, plus the token and document tables.

Documents are shuffled with the manifest seed, each gets a train/test split, and their
tokens are packed back to back (an EOS after each) into windows of ``context_length``
that start with BOS. BOS and EOS rows are flagged ``is_special`` so that training and
metrics skip them; every other row belongs to exactly one document.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.harvest_manifest import TokenizationSpec
from pipeline.text_sources import Document

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


def build_windows(documents: list[Document], tokenizer, spec: TokenizationSpec) -> TokenWindows:
    rng = np.random.default_rng(spec.seed)
    order = rng.permutation(len(documents))
    is_test = rng.random(len(documents)) < spec.test_fraction
    bos, eos = _special_id(tokenizer, "bos_token_id"), _special_id(tokenizer, "eos_token_id")

    ids: list[int] = []
    doc_of: list[int] = []
    special: list[bool] = []
    used = 0
    ctx = spec.context_length

    def push(token: int, doc: int, is_special: bool) -> None:
        if spec.prepend_bos and len(ids) % ctx == 0:
            ids.append(bos)
            doc_of.append(-1)
            special.append(True)
        ids.append(token)
        doc_of.append(doc)
        special.append(is_special)

    cursor = 0
    while len(ids) < spec.num_tokens:
        if cursor >= len(order):
            raise CorpusTooSmallError(
                f"tokenization.num_tokens: asked for {spec.num_tokens} tokens but the text "
                f"source holds only {len(ids)}"
            )
        batch = [documents[i] for i in order[cursor : cursor + TOKENIZE_BATCH]]
        encoded = tokenizer([d.text for d in batch], add_special_tokens=False)["input_ids"]
        for doc_tokens in encoded:
            doc_id = cursor
            cursor += 1
            used = cursor
            for token in doc_tokens:
                push(int(token), doc_id, False)
            push(eos, -1, True)
            if len(ids) >= spec.num_tokens:
                break
    n = spec.num_tokens
    token_ids = np.asarray(ids[:n], dtype=np.int32)
    doc_ids = np.asarray(doc_of[:n], dtype=np.int32)
    positions = np.tile(np.arange(ctx, dtype=np.int32), n // ctx)

    unique = np.unique(token_ids)
    texts = dict(
        zip(unique.tolist(), tokenizer.batch_decode([[t] for t in unique.tolist()]), strict=True)
    )
    tokens = pa.table(
        {
            "token_id": token_ids,
            "doc_id": doc_ids,
            "position": positions,
            "token_text": pa.array([texts[t] for t in token_ids.tolist()], pa.string()),
            "is_special": np.asarray(special[:n], dtype=bool),
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
    return TokenWindows(token_ids.reshape(-1, ctx), tokens, documents_table)
