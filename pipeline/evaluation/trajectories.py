"""Trajectory statistics: how a multi-layer latent's direction moves across the layers.

A latent of a crosscoder or fmxcoder writes (and reads) one vector per layer: an ``[L, d]``
matrix. A per_latent rank-R decoder can only represent matrices of rank <= R, so whether
real latents are low-rank decides whether that reading fits them. Per latent, in raw units
(each layer's normalisation undone, factorised weights expanded):

Each statistic is also given in normalised units (``dec_norm``/``enc_norm``), where every
layer has the same mean norm: in raw units the residual stream's growth with depth lets a
few late layers hold most of even a random latent's energy (SmolLM2 cpu-large, untrained
crosscoder: decoder top-2 share 0.78 raw, 0.24 normalised), while the training loss weighs
every layer alike. A per-layer scale does not turn a vector, so cosines differ between the
two only through which layers carry the latent.

* ``top1``/``top2``/``top3``: share of the matrix's energy (squared Frobenius norm) in its
  top 1/2/3 singular directions. A rank-1 latent scores 1.0; a random ``[L, d]`` matrix
  with d >> L scores about k/L.
* ``carry``: how many layers carry it, a layer counting when its vector's norm is at least
  ``CARRY_RATIO`` of the latent's largest per-layer norm. Relative to the latent's own
  peak, so it needs no scale and no L: a layer writing under 1/16 of the peak layer's
  energy adds little, and a planted feature's per-layer profile (0.5..1.5) stays inside.
* ``adjacent_cos``: mean cosine between the vectors of consecutive layers that both
  carry; ``first_last_cos``: cosine between the first and last carrying layers. NaN when
  fewer than two layers carry (nothing moves).

Everything comes from the ``[L, L]`` Gram matrix of each latent (singular values are the
square roots of its eigenvalues), computed in chunks so memory stays at one chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CARRY_RATIO = 0.25  # of the latent's peak per-layer norm
TOP_KS = (1, 2, 3)
# raw units (as every other metric), and normalised ones (the units the training loss weighs:
# every layer at the same mean norm, so a late layer's larger raw norm does not dominate)
SIDES = ("dec", "enc", "dec_norm", "enc_norm")
STATISTICS = ("top1", "top2", "top3", "adjacent_cos", "first_last_cos", "carry")


@dataclass(frozen=True)
class Trajectories:
    """Per-latent trajectory statistics of one weight side (``[m]`` arrays)."""

    top: np.ndarray  # [m, len(TOP_KS)] energy share in the top k singular directions
    adjacent_cos: np.ndarray  # [m]
    first_last_cos: np.ndarray  # [m]
    carry: np.ndarray  # [m] layers carrying the latent

    def columns(self) -> dict[str, np.ndarray]:
        out = {f"top{k}": self.top[:, j] for j, k in enumerate(TOP_KS)}
        return out | {
            "adjacent_cos": self.adjacent_cos,
            "first_last_cos": self.first_last_cos,
            "carry": self.carry.astype(float),
        }


def _from_gram(gram: np.ndarray) -> Trajectories:
    """Statistics of latents from their Gram matrices ``[m, L, L]``."""
    m, n_layers, _ = gram.shape
    eig = np.clip(np.linalg.eigvalsh(gram)[:, ::-1], 0, None)  # descending
    total = eig.sum(1, keepdims=True)
    cumulative = np.cumsum(eig, axis=1)[:, [min(k, n_layers) - 1 for k in TOP_KS]]
    with np.errstate(invalid="ignore", divide="ignore"):
        top = np.where(total > 0, cumulative / total, np.nan)
    norms = np.sqrt(np.clip(np.einsum("mll->ml", gram), 0, None))  # [m, L]
    peak = norms.max(1, keepdims=True)
    carries = (norms >= CARRY_RATIO * peak) & (peak > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = gram / (norms[:, :, None] * norms[:, None, :])
    rows = np.arange(m)
    adjacent = np.einsum("mll->ml", cos[:, :-1, 1:])  # cos(l, l + 1), [m, L - 1]
    both = carries[:, :-1] & carries[:, 1:]
    with np.errstate(invalid="ignore"):
        adjacent_cos = np.where(both, adjacent, 0).sum(1) / both.sum(1)
    first = carries.argmax(1)
    last = n_layers - 1 - carries[:, ::-1].argmax(1)
    count = carries.sum(1)
    first_last = np.where(count >= 2, cos[rows, first, last], np.nan)
    adjacent_cos = np.where(both.any(1), adjacent_cos, np.nan)
    return Trajectories(top, adjacent_cos, first_last, count)


def trajectory_stats(weights: np.ndarray | torch.Tensor, chunk: int = 1024) -> Trajectories:
    """Statistics of every latent of ``weights [m, L, d]`` (one weight side, raw units)."""
    w = torch.as_tensor(weights).detach().to("cpu", torch.float64)
    parts = [
        _from_gram(torch.einsum("mld,mkd->mlk", block, block).numpy()) for block in w.split(chunk)
    ]
    return Trajectories(
        np.concatenate([p.top for p in parts]),
        np.concatenate([p.adjacent_cos for p in parts]),
        np.concatenate([p.first_last_cos for p in parts]),
        np.concatenate([p.carry for p in parts]),
    )


def raw_weights(coder, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Decoder and encoder as ``[m, L, d]`` in raw units. Training sees ``x * s_l``, so a
    decoder row writes ``W / s_l`` in raw units and an encoder column reads ``W * s_l``."""
    s = scale.detach().to("cpu", torch.float64).view(1, -1, 1)
    with torch.no_grad():
        dec = coder.decoder_weight().detach().to("cpu", torch.float64) / s
        enc = coder.encoder_weight().detach().to("cpu", torch.float64).permute(2, 0, 1) * s
    return {"dec": dec, "enc": enc}


def is_multi_layer(coder) -> bool:
    """Only latents that read and write several layers have a trajectory."""
    return coder.n_layers > 1 and coder.latent_layer() is None


def coder_trajectories(coder, scale: torch.Tensor) -> dict[str, Trajectories] | None:
    """Decoder and encoder statistics of a multi-layer coder in raw and in normalised units
    (``SIDES``); None for per-layer coders."""
    if not is_multi_layer(coder):
        return None
    weights = raw_weights(coder, scale)
    weights |= {f"{k}_norm": w for k, w in raw_weights(coder, torch.ones_like(scale)).items()}
    return {side: trajectory_stats(w) for side, w in weights.items()}


def _quantile(values: np.ndarray, q: float) -> float:
    finite = values[np.isfinite(values)]
    return float(np.quantile(finite, q)) if finite.size else float("nan")


def median_columns(traj: dict[str, Trajectories] | None, alive: np.ndarray) -> dict[str, float]:
    """``traj_<side>_<statistic>``: the median over alive latents (NaN without a trajectory)."""
    out = {}
    for side in SIDES:
        for stat in STATISTICS:
            values = traj[side].columns()[stat][alive] if traj else np.zeros(0)
            out[f"traj_{side}_{stat}"] = _quantile(values, 0.5)
    return out


def latent_columns(traj: dict[str, Trajectories] | None, m: int) -> dict[str, np.ndarray]:
    """``traj_<side>_<statistic>`` per latent ``[m]``, for the per-latent table."""
    return {
        f"traj_{side}_{stat}": traj[side].columns()[stat] if traj else np.full(m, np.nan)
        for side in SIDES
        for stat in STATISTICS
    }


def quantile_rows(
    name: str, traj: dict[str, Trajectories], alive: np.ndarray, sides: tuple = SIDES
) -> list[dict]:
    """One row per side and statistic: the 10th, 50th and 90th percentile over alive latents."""
    return [
        {
            "variant": name,
            "side": side,
            "statistic": stat,
            "n_alive": int(alive.sum()),
            **{f"p{q}": _quantile(values[alive], q / 100) for q in (10, 50, 90)},
        }
        for side in sides
        for stat, values in traj[side].columns().items()
    ]


def format_quantiles(rows: list[dict]) -> str:
    """A fixed-width table of ``quantile_rows``."""
    width = max([len("variant"), *(len(r["variant"]) for r in rows)]) + 2
    head = f"{'variant':<{width}}{'side':<10}{'statistic':<16}{'p10':>8}{'median':>8}{'p90':>8}"
    lines = [head]
    for r in rows:
        cells = "".join(f"{r[p]:>8.3f}" for p in ("p10", "p50", "p90"))
        lines.append(f"{r['variant']:<{width}}{r['side']:<10}{r['statistic']:<16}{cells}")
    return "\n".join(lines)
