"""Top-activating tokens per latent, and the text windows around them, for the judge and report.

One streaming pass keeps, per latent, the ``n_top`` largest activations and their global
token rows: each batch is merged with a top-k over ``[n_top + B]`` candidates, so memory
stays ``n_top x latents`` whatever the eval size. Windows stop at document and context
window edges, skip special tokens, and mark active tokens ``<<like this>>``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor


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
        values, idx = torch.cat([self.values, f]).topk(self.n_top, dim=0)
        from_old = idx < self.n_top
        old = self.rows.gather(0, idx.clamp(max=self.n_top - 1))
        new = rows[(idx - self.n_top).clamp(min=0)]
        self.rows = torch.where(torch.isfinite(values), torch.where(from_old, old, new), -1)
        self.values = values

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(values, rows)``, each ``[n_tracked_latents, n_top]``, best first; row -1 = none."""
        return self.values.T.numpy().copy(), self.rows.T.numpy().copy()


@dataclass(frozen=True)
class TokenView:
    """The token-table columns that windows need, as arrays."""

    text: list[str]
    doc_id: np.ndarray
    position: np.ndarray
    is_special: np.ndarray

    @classmethod
    def from_table(cls, tokens: pa.Table) -> TokenView:
        return cls(
            tokens["token_text"].to_pylist(),
            tokens["doc_id"].to_numpy(),
            tokens["position"].to_numpy(),
            tokens["is_special"].to_numpy(zero_copy_only=False),
        )


def window_rows(view: TokenView, row: int, before: int = 12, after: int = 4) -> np.ndarray:
    """Contiguous rows around ``row`` in the same context window and document, no specials."""
    start, stop = max(0, row - before), min(len(view.text), row + after + 1)
    rows = np.arange(start, stop)
    same_window = view.position[rows] - view.position[row] == rows - row
    keep = same_window & (view.doc_id[rows] == view.doc_id[row]) & ~view.is_special[rows]
    return rows[keep]


def format_context(texts: list[str], active: np.ndarray) -> str:
    """Join token texts, wrapping active ones in ``<<>>`` (leading space kept outside)."""
    out = []
    for text, on in zip(texts, active.tolist(), strict=True):
        if on and text.strip():
            lead = text[: len(text) - len(text.lstrip())]
            out.append(f"{lead}<<{text.strip()}>>")
        else:
            out.append(text)
    return "".join(out).strip()
