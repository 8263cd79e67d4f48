"""Spliced-in next-token loss: does the model still work on a coder's reconstruction?

For each read layer ``l`` the residual ``blocks.l.hook_*`` is replaced (at non-special
positions; BOS/EOS keep their clean value, as coders never saw them) by the coder's
reconstruction in raw units, or by zeros, and the forward continues. Scored on next-token
predictions from evaluated (held-out) rows:
``score_l = (CE_zero - CE_coder) / (CE_zero - CE_clean)`` (1 = lossless, 0 = as bad as
zero-ablation) and ``KL(clean || spliced)``. A cross-layer coder reconstructs every layer
from all of them at once, so the clean forward captures every read layer first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor
from tqdm import tqdm

from pipeline.evaluation.run_metrics import Variant
from pipeline.store.reader import ActivationStore


@dataclass(frozen=True)
class SpliceResult:
    hooks: list[str]  # the variant's layers
    ce_clean: float
    ce_zero: np.ndarray  # [L]
    ce_coder: np.ndarray  # [L]
    kl: np.ndarray  # [L] nats per token
    score: np.ndarray  # [L]
    n_tokens: int  # scored predictions


def eval_windows(
    tokens: pa.Table, eval_rows: np.ndarray, context_length: int, max_windows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(token ids [W, T], scored [W, T], special [W, T])`` for the first windows holding
    evaluated rows; position t is scored when row t is evaluated and t + 1 is in the window."""
    ids = tokens["token_id"].to_numpy().reshape(-1, context_length)
    special = tokens["is_special"].to_numpy(zero_copy_only=False).reshape(-1, context_length)
    evaluated = np.zeros(ids.size, dtype=bool)
    evaluated[eval_rows] = True
    evaluated = evaluated.reshape(-1, context_length)
    evaluated[:, -1] = False
    chosen = np.flatnonzero(evaluated.any(1))[:max_windows]
    return ids[chosen], evaluated[chosen], special[chosen]


def _ce(logits: Tensor, targets: Tensor, scored: Tensor) -> Tensor:
    lp = logits[:, :-1].float().log_softmax(-1)
    nll = -lp.gather(-1, targets[:, 1:, None])[..., 0]
    return nll[scored[:, :-1]]


class _Sums:
    def __init__(self, n: int) -> None:
        self.ce = np.zeros(n)
        self.kl = np.zeros(n)


def _capture(store: dict[str, Tensor], name: str):
    def hook(activation: Tensor, hook) -> Tensor:
        store[name] = activation.detach().clone()
        return activation

    return hook


def _replace(replacement: Tensor, keep: Tensor):
    """Swap in ``replacement`` except where ``keep`` (special tokens stay clean)."""

    def hook(activation: Tensor, hook) -> Tensor:
        new = replacement.view_as(activation).to(activation.dtype)
        return torch.where(keep[..., None], activation, new)

    return hook


class _Batch:
    """One batch of windows: the clean forward, then one forward per splice."""

    def __init__(self, bridge, ids: Tensor, scored: Tensor, keep: Tensor, hooks: list[str]):
        self.bridge, self.ids, self.scored, self.keep = bridge, ids, scored, keep
        captured: dict[str, Tensor] = {}
        logits = bridge.run_with_hooks(ids, fwd_hooks=[(h, _capture(captured, h)) for h in hooks])
        self.clean_lp = logits[:, :-1].float().log_softmax(-1)[scored[:, :-1]]
        self.clean_ce = float(_ce(logits, ids, scored).sum())
        self.n = int(scored[:, :-1].sum())
        self.raw = torch.stack([captured[h] for h in hooks], dim=2).flatten(0, 1).float()

    def spliced(self, hook_name: str, replacement: Tensor) -> tuple[float, float]:
        """Summed CE and KL(clean || spliced) over the scored positions."""
        hook = _replace(replacement, self.keep)
        out = self.bridge.run_with_hooks(self.ids, fwd_hooks=[(hook_name, hook)])
        lp = out[:, :-1].float().log_softmax(-1)[self.scored[:, :-1]]
        kl = float((self.clean_lp.exp() * (self.clean_lp - lp)).sum())
        return float(_ce(out, self.ids, self.scored).sum()), kl


@torch.no_grad()
def splice_scores(
    model,
    variants: list[Variant],
    union_hooks: list[str],
    windows: tuple[np.ndarray, np.ndarray, np.ndarray],
    batch_windows: int = 4,
    progress: bool = True,
) -> dict[str, SpliceResult]:
    """Per variant, CE/KL of splicing its reconstruction into each of its layers."""
    ids_all, scored_all, special_all = windows
    zero = _Sums(len(union_hooks))
    sums = {v.name: _Sums(len(v.layers)) for v in variants}
    clean_ce, n_scored = 0.0, 0
    batches = range(0, ids_all.shape[0], batch_windows)
    for start in tqdm(batches, desc="splice", unit="batch", disable=not progress):
        part = slice(start, start + batch_windows)
        batch = _Batch(
            model.bridge,
            torch.from_numpy(ids_all[part]).long().to(model.device),
            torch.from_numpy(scored_all[part]).to(model.device),
            torch.from_numpy(special_all[part]).to(model.device),
            union_hooks,
        )
        clean_ce += batch.clean_ce
        n_scored += batch.n
        for j, hook_name in enumerate(union_hooks):
            zero.ce[j] += batch.spliced(hook_name, torch.zeros_like(batch.raw[:, j]))[0]
        for v in variants:
            x_hat = v.coder.decode(v.coder.encode(v.normalise(batch.raw)))
            raw_hat = v.normaliser.invert(x_hat)
            for j, column in enumerate(v.columns.tolist()):
                ce, kl = batch.spliced(union_hooks[column], raw_hat[:, j])
                sums[v.name].ce[j] += ce
                sums[v.name].kl[j] += kl
    n = max(n_scored, 1)
    ce_clean = clean_ce / n
    out = {}
    for v in variants:
        ce_zero = zero.ce[v.columns.numpy()] / n
        ce_coder = sums[v.name].ce / n
        with np.errstate(divide="ignore", invalid="ignore"):
            score = (ce_zero - ce_coder) / (ce_zero - ce_clean)
        out[v.name] = SpliceResult(
            [union_hooks[c] for c in v.columns.tolist()],
            ce_clean,
            ce_zero,
            ce_coder,
            sums[v.name].kl / n,
            score,
            n_scored,
        )
    return out


def load_store_model(store: ActivationStore, device: torch.device):
    """The harvested model, as the store's manifest names it."""
    from pipeline.harvest.models import load_model
    from pipeline.manifests.harvest import ModelSpec

    return load_model(ModelSpec.model_validate(store.manifest["manifest"]["model"]), str(device))
