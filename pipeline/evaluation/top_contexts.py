"""Top-activating tokens per latent, and the text windows around them, for the judge and report.

One streaming pass keeps, per latent, the ``n_top`` largest activations and their global
token rows: each batch is merged with a top-k over ``[n_top + B]`` candidates, so memory
stays ``n_top x latents`` whatever the eval size. Windows stop at document and context
window edges, skip special tokens, and mark active tokens ``<<like this>>``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from pipeline.harvest.token_text import REPLACEMENT, decode_pieces

Decode = Callable[[list[int]], str]  # token ids -> text (a tokenizer's ``decode``)


def store_decode(model_spec: dict) -> Decode | None:
    """The ``decode`` of the tokenizer a store was harvested with, when it is on this
    machine (packaged, GGUF or random models); None for hub models or a missing file."""
    try:
        from transformers import AutoTokenizer

        from pipeline.harvest.models import _local_dir
        from pipeline.manifests.harvest import ModelSpec

        local = _local_dir(ModelSpec.model_validate(model_spec))
        return None if local is None else AutoTokenizer.from_pretrained(local).decode
    except (OSError, ValueError, ImportError):
        return None


def _by_value_then_row(values: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Each column ordered by value (highest first), equal values by row (lowest first)."""
    by_row = rows.argsort(dim=0, stable=True)
    values, rows = values.gather(0, by_row), rows.gather(0, by_row)
    by_value = values.argsort(dim=0, descending=True, stable=True)
    return values.gather(0, by_value), rows.gather(0, by_value)


class TopContexts:
    """Bounded per-latent top-n of (activation, row); only positive activations count."""

    def __init__(self, n_latents: int, n_top: int = 20, latents: Tensor | None = None) -> None:
        self.latents = torch.arange(n_latents) if latents is None else latents.long().cpu()
        k = self.latents.numel()
        self.n_top = n_top
        self.values = torch.full((n_top, k), -torch.inf)
        self.rows = torch.full((n_top, k), -1, dtype=torch.long)

    @torch.no_grad()
    def update(self, f: Tensor, rows: Tensor | np.ndarray) -> None:
        rows = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        f = f.detach().cpu().float()[:, self.latents]
        f = torch.where(f > 0, f, -torch.inf)
        cat = torch.cat([self.values, f])
        cat_rows = torch.cat([self.rows, rows[:, None].expand(-1, f.shape[1])])
        values, idx = cat.topk(self.n_top, dim=0)
        picked = cat_rows.gather(0, idx)
        # topk picks among equal values as its kernel happens to: where the n-th value ties
        # with one left out, a stable sort keeps the earliest rows (old entries come first)
        tied = torch.isfinite(values[-1]) & ((cat >= values[-1]).sum(0) > self.n_top)
        if bool(tied.any()):
            cols = tied.nonzero().squeeze(1)
            order = torch.sort(cat[:, cols], dim=0, descending=True, stable=True).indices
            values[:, cols] = cat[:, cols].gather(0, order[: self.n_top])
            picked[:, cols] = cat_rows[:, cols].gather(0, order[: self.n_top])
        values, picked = _by_value_then_row(values, picked)
        self.rows = torch.where(torch.isfinite(values), picked, -1)
        self.values = values

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(values, rows)``, each ``[n_tracked_latents, n_top]``, best first; row -1 = none."""
        return self.values.T.numpy().copy(), self.rows.T.numpy().copy()


@dataclass(frozen=True)
class TokenView:
    """The token-table columns that windows need, as arrays.

    Stores harvested before token text came from offsets hold U+FFFD for every piece of a
    split character; given the tokenizer's ``decode``, such a view decodes each window from
    its token ids instead, so characters come out whole (``token_text.decode_pieces``)."""

    text: list[str]
    doc_id: np.ndarray
    position: np.ndarray
    is_special: np.ndarray
    token_id: np.ndarray | None = None
    decode: Decode | None = None

    @classmethod
    def from_table(
        cls, tokens: pa.Table, load_decode: Callable[[], Decode | None] | None = None
    ) -> TokenView:
        """``load_decode`` is called (to load a tokenizer) only when the text is broken."""
        text = tokens["token_text"].to_pylist()
        broken = load_decode is not None and any(REPLACEMENT in t for t in text if t)
        decode = load_decode() if broken else None
        return cls(
            text,
            tokens["doc_id"].to_numpy(),
            tokens["position"].to_numpy(),
            tokens["is_special"].to_numpy(zero_copy_only=False),
            tokens["token_id"].to_numpy() if decode is not None else None,
            decode,
        )

    def texts(self, rows: np.ndarray) -> list[str]:
        """Token texts of contiguous rows of one document, characters kept whole."""
        rows = np.asarray(rows)
        if self.decode is None or self.token_id is None or rows.size == 0:
            return [self.text[r] for r in rows.tolist()]
        lo, hi = int(rows[0]), int(rows[-1])
        if hi - lo + 1 != rows.size:  # not contiguous: decode as given
            return decode_pieces(self.decode, self.token_id[rows].tolist())
        # A character cut by the window's edge is completed by the tokens beside it.
        start, stop = self._extend(lo, -1), self._extend(hi, 1)
        pieces = decode_pieces(self.decode, self.token_id[start : stop + 1].tolist())
        pieces = pieces[lo - start : lo - start + rows.size]
        pieces[0] = pieces[0].lstrip(REPLACEMENT)  # still cut: the document edge
        pieces[-1] = pieces[-1].rstrip(REPLACEMENT)
        return pieces

    def _extend(self, row: int, step: int, most: int = 4) -> int:
        """Up to ``most`` rows beyond ``row`` in the same document (a character's bytes)."""
        out = row
        while 0 <= out + step < len(self.text) and abs(out + step - row) <= most:
            nxt = out + step
            if self.doc_id[nxt] != self.doc_id[row] or self.is_special[nxt]:
                break
            out = nxt
        return out


def window_rows(view: TokenView, row: int, before: int = 12, after: int = 4) -> np.ndarray:
    """Contiguous rows around ``row`` in the same context window and document, no specials."""
    start, stop = max(0, row - before), min(len(view.text), row + after + 1)
    rows = np.arange(start, stop)
    same_window = view.position[rows] - view.position[row] == rows - row
    keep = same_window & (view.doc_id[rows] == view.doc_id[row]) & ~view.is_special[rows]
    return rows[keep]


def format_context(texts: list[str], active: np.ndarray) -> str:
    """Join token texts, wrapping active ones in ``<<>>`` (leading space kept outside). An
    active token with no visible text (whitespace, or the empty share of a multi-token
    character) still shows as ``<<>>``, so a reader (or judge) sees where it fired."""
    out = []
    for text, on in zip(texts, active.tolist(), strict=True):
        if on:
            lead = text[: len(text) - len(text.lstrip())]
            out.append(f"{lead}<<{text.strip()}>>")
        else:
            out.append(text)
    return "".join(out).strip()
