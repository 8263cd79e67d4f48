"""Recovery of planted features, and calibration of per-latent metrics against true spans.

On a planted cache the true features are known (``pipeline/harvest/planted.py``). For each true
feature, MMCS is the best cosine between its whole ``L x d`` direction and a decoder row,
compared in raw units (decoder rows are trained in normalised units, so each layer is
divided by the loader's scale first). A feature counts as recovered above ``RECOVERED``.
Then, for features matched above ``MATCHED``, every per-latent metric of the matched
latent is set against the feature's true layer span: a coherence metric worth reporting
ranks the spans correctly (Spearman rho) and reads about 1 on single-layer features.
Metrics come in as a dict of per-latent arrays, so any new metric plugs in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import spearmanr

from pipeline.harvest.planted import KINDS, PlantedFeatures

RECOVERED = 0.9  # MMCS above which a feature counts as recovered
MATCHED = 0.7  # MMCS above which a feature's best latent enters the calibration


@dataclass(frozen=True)
class TruthView:
    """The true features as one coder sees them: its layers only, raw units."""

    directions: np.ndarray  # [F, L_view, d]
    span: np.ndarray  # [F] layers of the view the feature has weight on
    kind: np.ndarray  # [F] index into KINDS

    @classmethod
    def of(cls, features: PlantedFeatures, layers: list[int]) -> TruthView:
        """``layers``: indices into the planted layers; features absent from them drop."""
        directions = features.directions[:, layers]
        span = (np.linalg.norm(directions, axis=2) > 0).sum(1)
        keep = span > 0
        return cls(directions[keep], span[keep], features.kind[keep])


@dataclass(frozen=True)
class Recovery:
    mmcs: np.ndarray  # [F] best cosine with any decoder row
    latent: np.ndarray  # [F] the latent achieving it
    span: np.ndarray  # [F]
    kind: np.ndarray  # [F]

    def recovered(self) -> np.ndarray:
        return self.mmcs > RECOVERED

    def summary(self) -> dict:
        """Mean MMCS and recovered share overall, by kind and by true span."""
        out = {
            "n_features": int(self.mmcs.size),
            "mmcs": float(self.mmcs.mean()) if self.mmcs.size else float("nan"),
            "recovered": float(self.recovered().mean()) if self.mmcs.size else float("nan"),
            "by_kind": {},
            "by_span": {},
        }
        for k, name in enumerate(KINDS):
            out["by_kind"][name] = _group(self, self.kind == k)
        for span in np.unique(self.span):
            out["by_span"][str(int(span))] = _group(self, self.span == span)
        return out


def _group(rec: Recovery, where: np.ndarray) -> dict:
    if not where.any():
        return {"n": 0, "mmcs": float("nan"), "recovered": float("nan")}
    return {
        "n": int(where.sum()),
        "mmcs": float(rec.mmcs[where].mean()),
        "recovered": float(rec.recovered()[where].mean()),
    }


def raw_decoder(decoder: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """Decoder rows ``[m, L, d]`` from normalised units back to raw units."""
    return (decoder.detach().double().cpu() / scale.detach().double().cpu().view(1, -1, 1)).numpy()


def recover(truth: TruthView, decoder_raw: np.ndarray, block: int = 4096) -> Recovery:
    """MMCS of every true feature against decoder rows ``[m, L, d]`` (same units)."""
    t = truth.directions.reshape(truth.directions.shape[0], -1)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    best = np.full(t.shape[0], -np.inf)
    arg = np.zeros(t.shape[0], dtype=np.int64)
    for start in range(0, decoder_raw.shape[0], block):
        w = decoder_raw[start : start + block].reshape(-1, t.shape[1])
        norms = np.linalg.norm(w, axis=1)
        cos = (t @ w.T) / np.where(norms > 0, norms, np.inf)[None, :]
        here = cos.argmax(1)
        value = cos[np.arange(t.shape[0]), here]
        better = value > best
        best[better], arg[better] = value[better], start + here[better]
    return Recovery(best, arg, truth.span, truth.kind)


def calibrate(
    rec: Recovery,
    metrics: dict[str, np.ndarray],
    kinds: tuple[str, ...] = ("single", "spanning"),
    threshold: float = MATCHED,
) -> dict[str, dict]:
    """Each per-latent metric of the matched latents against the true span.

    Only features of ``kinds`` enter (a co-occurring feature's span is 1, but a latent that
    merges its group legitimately reads more layers). Returns, per metric, the number of
    matched features with a defined value, the Spearman rho with the span (does it rank
    spans?), the mean absolute error against the span (does it read in layers?), and the
    mean value per span.
    """
    wanted = np.isin(rec.kind, [KINDS.index(k) for k in kinds]) & (rec.mmcs > threshold)
    out = {}
    for name, per_latent in metrics.items():
        values = np.asarray(per_latent, dtype=float)[rec.latent]
        ok = wanted & np.isfinite(values)
        span, v = rec.span[ok], values[ok]
        rho = float("nan")
        if ok.sum() >= 3 and np.unique(span).size > 1 and np.unique(v).size > 1:
            rho = float(spearmanr(span, v).statistic)
        out[name] = {
            "n": int(ok.sum()),
            "spearman": rho,
            "abs_error": float(np.abs(v - span).mean()) if ok.any() else float("nan"),
            "mean_by_span": {str(int(s)): float(v[span == s].mean()) for s in np.unique(span)},
        }
    return out


def feature_rows(name: str, rec: Recovery, metrics: dict[str, np.ndarray]) -> list[dict]:
    """One row per true feature: its kind, span, MMCS, matched latent and that latent's metrics."""
    return [
        {
            "variant": name,
            "feature": f,
            "kind": KINDS[int(rec.kind[f])],
            "span": int(rec.span[f]),
            "mmcs": float(rec.mmcs[f]),
            "latent": int(rec.latent[f]),
            **{k: float(np.asarray(v, dtype=float)[rec.latent[f]]) for k, v in metrics.items()},
        }
        for f in range(rec.mmcs.size)
    ]


def summary_columns(summary: dict, calibration: dict[str, dict]) -> dict[str, float]:
    """Flat columns for a variant's summary row."""
    out = {"mmcs": summary["mmcs"], "recovered": summary["recovered"]}
    for kind, group in summary["by_kind"].items():
        out[f"recovered_{kind}"] = group["recovered"]
    for metric, cal in calibration.items():
        out[f"span_rho_{metric}"] = cal["spearman"]
        out[f"span_error_{metric}"] = cal["abs_error"]
    return out


def planted_truth(store_manifest: dict) -> tuple[PlantedFeatures, list[int]] | None:
    """The true features and the planted layers stored, or None for a cache of a real model.

    Regenerated from the harvest manifest saved in the store (the generator is
    deterministic in it), so nothing besides the normal store files is needed.
    """
    from pipeline.harvest.planted import hook_layers, planted_features
    from pipeline.manifests.harvest import HarvestManifest

    manifest = HarvestManifest.model_validate(store_manifest["manifest"])
    if manifest.model.source != "planted":
        return None
    return planted_features(manifest.model.planted_spec), hook_layers(manifest)


def per_latent_metrics(res) -> dict[str, np.ndarray]:
    """The per-latent metrics of a ``VariantResult`` that the calibration sets against spans."""
    out = {"fc": res.coherence.fc, "fc_abs": res.coherence.fc_abs, "d_eff": res.d_eff}
    if res.masking is not None:
        out["fc_ablation"] = res.masking.fc_ablation
    return out


def evaluate_variant(res, features: PlantedFeatures, stored_layers: list[int]) -> dict:
    """Recovery summary, calibration and per-feature rows of one evaluated variant."""
    v = res.variant
    truth = TruthView.of(features, [stored_layers[j] for j in v.layers])
    with torch.no_grad():
        rec = recover(truth, raw_decoder(v.coder.decoder_weight(), v.scale))
    metrics = per_latent_metrics(res)
    summary, calibration = rec.summary(), calibrate(rec, metrics)
    return {
        "summary": summary,
        "calibration": calibration,
        "columns": summary_columns(summary, calibration),
        "rows": feature_rows(v.name, rec, metrics),
    }
