"""Massive-activation tokens: the few residuals whose norm dwarfs every other token's.

Some models park an attention sink on a handful of content tokens. In the cpu-large
SmolLM2-135M cache, 16 of 64,485 tokens (all at position 1, right after BOS) have norms
40-160x their layer's median in layers 11-26 and carry 37-62% of those layers' squared
norm. Left in, those 16 tokens decide what FVU and MSE measure (the validation split held
none of them and read FVU 0.29 where train and test read 0.17) and how each layer is
scaled. Gemma-3-270M and the planted caches have none (max 10x and 25x the median).

The rule, applied alike to training, validation, evaluation and the normalisation
statistics: a token is an outlier when its norm at any stored layer exceeds ``ratio``
times that layer's median norm. The scan reads every chunk once and is cached beside the
other derived files (never in the store, which stays read-only), checksummed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import crc32c
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from pipeline.store.format import atomic_write_bytes, safetensors_bytes
from pipeline.store.reader import ActivationStore
from pipeline.store.writer import block_statistics, statistics_from_totals

DEFAULT_RATIO = 30.0
# Tokens the median is taken over: enough for a stable median, a few chunks to decode.
MEDIAN_SAMPLE_TOKENS = 65_536
STAT_NAMES = ("mean", "mean_norm", "rms_norm", "centred_rms_norm")


@dataclass(frozen=True)
class OutlierScan:
    """Which rows a ratio excludes, what they weigh, and the statistics of the rest."""

    ratio: float
    rows: np.ndarray  # excluded store rows, ascending, int64
    n_tokens: int  # non-special tokens scanned
    median_norm: Tensor  # [n_layers] of the store
    energy_share: Tensor  # [n_layers]: the excluded tokens' share of the summed ||x||^2
    stats: dict[str, Tensor]  # the store's statistics, recomputed over the kept tokens

    def summary(self) -> str:
        top = float(self.energy_share.max()) if self.energy_share.numel() else 0.0
        return (
            f"{self.rows.size} of {self.n_tokens:,} tokens have a norm above "
            f"{self.ratio:g}x their layer's median (up to {top:.0%} of a layer's squared norm)"
        )


def _special_mask(store: ActivationStore) -> np.ndarray:
    return store.tokens(columns=["is_special"])["is_special"].to_numpy(zero_copy_only=False)


def _chunk_norms(store: ActivationStore, chunk: int) -> tuple[int, Tensor]:
    start, stop = store.chunk_rows(chunk)
    return start, store.read(start, stop).norm(dim=-1)  # [rows, n_layers] float32


def median_norms(store: ActivationStore, special: np.ndarray) -> Tensor:
    """Per-layer median token norm over the first ``MEDIAN_SAMPLE_TOKENS`` ordinary tokens
    of chunks in a seeded random order (a sample that spans the store)."""
    order = torch.randperm(store.n_chunks, generator=torch.Generator().manual_seed(0))
    norms, seen = [], 0
    for chunk in order.tolist():
        start, n = _chunk_norms(store, chunk)
        n = n[torch.from_numpy(~special[start : start + n.shape[0]])]
        norms.append(n)
        seen += n.shape[0]
        if seen >= MEDIAN_SAMPLE_TOKENS:
            break
    return torch.cat(norms).median(dim=0).values


def scan(store: ActivationStore, ratio: float) -> OutlierScan:
    """One pass over every chunk: the outlier rows and float64 sums over the kept ones."""
    special = _special_mask(store)
    median = median_norms(store, special)
    limit = ratio * median
    totals: dict[str, Tensor] = {}
    sq_all = torch.zeros(store.n_layers, dtype=torch.float64)
    excluded, count, scanned = [], 0, 0
    for chunk in range(store.n_chunks):
        start, stop = store.chunk_rows(chunk)
        x = store.read(start, stop)
        norms = x.norm(dim=-1)
        ordinary = torch.from_numpy(~special[start:stop])
        outlier = (norms > limit).any(dim=1) & ordinary
        keep = ordinary & ~outlier
        excluded.append(np.flatnonzero(outlier.numpy()) + start)
        for name, value in block_statistics(x, keep).items():
            totals[name] = totals[name] + value if name in totals else value
        sq_all += x[ordinary].double().norm(dim=-1).square().sum(0)  # as block_statistics
        count += int(keep.sum())
        scanned += int(ordinary.sum())
    if count == 0:
        raise ValueError(f"outlier scan: no ordinary token of cache {store.key} is kept")
    stats = statistics_from_totals(totals, count)
    share = (1 - totals["sq_norm_sum"] / sq_all.clamp_min(1e-30)).float()
    rows = np.concatenate(excluded).astype(np.int64) if excluded else np.zeros(0, np.int64)
    return OutlierScan(ratio, rows, scanned, median.float(), share, stats)


def _payload_crc(tensors: dict[str, Tensor]) -> str:
    value = 0
    for name in sorted(tensors):
        if tensors[name].numel() == 0:
            continue
        blob = tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        value = crc32c.crc32c(blob, value)
    return str(value)


def _tensors(result: OutlierScan) -> dict[str, Tensor]:
    return {
        "rows": torch.from_numpy(result.rows),
        "median_norm": result.median_norm,
        "energy_share": result.energy_share,
        **{f"stats.{k}": v for k, v in result.stats.items()},
    }


def _read(path, ratio: float) -> OutlierScan | None:
    """The cached scan, or None when it is missing or fails its checksum."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        tensors = load_file(path)
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        meta, tensors = {}, {}
    if meta.get("payload_crc32c") != _payload_crc(tensors) or float(meta["ratio"]) != ratio:
        print(f"warning: {path}: damaged outlier scan, scanning again", file=sys.stderr)
        return None
    stats = {k: tensors[f"stats.{k}"] for k in STAT_NAMES}
    return OutlierScan(
        ratio,
        tensors["rows"].numpy(),
        int(meta["n_tokens"]),
        tensors["median_norm"],
        tensors["energy_share"],
        stats,
    )


def outlier_scan(store: ActivationStore, ratio: float | None) -> OutlierScan | None:
    """The scan at ``ratio`` (None: no exclusion), measured once per store and ratio."""
    if ratio is None:
        return None
    from pipeline.paths import outlier_scan_file

    path = outlier_scan_file(store.key, ratio)
    cached = _read(path, ratio)
    if cached is not None:
        return cached
    result = scan(store, ratio)
    tensors = _tensors(result)
    meta = {
        "ratio": repr(float(ratio)),
        "n_tokens": str(result.n_tokens),
        "store": store.key,
        "payload_crc32c": _payload_crc(tensors),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, safetensors_bytes(tensors, meta))
    return result


def excluded_rows(result: OutlierScan | None) -> np.ndarray | None:
    return None if result is None else result.rows
