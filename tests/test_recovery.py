"""Recovery metrics and span calibration on hand-built decoders and metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.evaluation.recovery import (
    Recovery,
    TruthView,
    calibrate,
    raw_decoder,
    recover,
    summary_columns,
)
from pipeline.harvest.planted import KINDS, planted_features
from pipeline.manifests.harvest import PlantedSpec

SPEC = PlantedSpec(n_layers=5, d_model=12, n_single=6, n_spanning=5, n_groups=2, seed=3)


def test_a_decoder_of_the_true_features_scores_one_in_any_units() -> None:
    features = planted_features(SPEC)
    truth = TruthView.of(features, list(range(5)))
    scale = torch.tensor([0.5, 2.0, 3.0, 0.1, 7.0])
    decoder = torch.from_numpy(features.directions).float() * scale.view(1, -1, 1)
    noise = torch.randn(40, 5, 12, generator=torch.Generator().manual_seed(0))
    rows = torch.cat([noise, decoder])  # the true rows hidden among random ones
    rec = recover(truth, raw_decoder(rows, scale))
    assert np.allclose(rec.mmcs, 1.0, atol=1e-6)
    assert (rec.latent == 40 + np.arange(features.n_features)).all()
    summary = rec.summary()
    assert summary["recovered"] == 1.0 and summary["mmcs"] == pytest.approx(1.0)
    assert all(g["recovered"] == 1.0 for g in summary["by_kind"].values())
    assert all(g["recovered"] == 1.0 for g in summary["by_span"].values())
    # without undoing the scale, the spanning features no longer match exactly
    unscaled = recover(truth, rows.double().numpy())
    assert unscaled.mmcs[features.kind == KINDS.index("spanning")].max() < 0.999


def test_a_decoder_that_keeps_one_layer_of_a_spanning_feature_scores_its_share() -> None:
    features = planted_features(SPEC)
    i = int(np.flatnonzero(features.span >= 2)[0])
    keep = np.zeros_like(features.directions[i])
    first = features.start[i]
    keep[first] = features.directions[i, first]
    truth = TruthView.of(features, list(range(5)))
    rec = recover(truth, keep[None])
    expected = np.linalg.norm(keep) / np.linalg.norm(features.directions[i])
    assert rec.mmcs[i] == pytest.approx(expected)
    assert rec.summary()["by_kind"]["spanning"]["recovered"] < 1.0


def test_truth_view_drops_features_outside_the_layers_read() -> None:
    features = planted_features(SPEC)
    view = TruthView.of(features, [0])
    on_zero = np.linalg.norm(features.directions[:, 0], axis=1) > 0
    assert view.directions.shape == (on_zero.sum(), 1, 12)
    assert (view.span == 1).all()


def _recovery() -> Recovery:
    span = np.array([1, 1, 2, 3, 4, 1, 2])
    kind = np.array([0, 0, 1, 1, 1, 2, 1])
    mmcs = np.array([0.95, 0.8, 0.9, 0.99, 0.75, 0.95, 0.1])
    return Recovery(mmcs, np.arange(7), span, kind)


def test_calibration_ranks_spans_and_skips_unmatched_and_cooccurring() -> None:
    rec = _recovery()
    metrics = {
        "tracks": np.array([1.0, 1.2, 2.1, 2.9, 4.2, 9.0, 9.0]),
        "reversed": np.array([4.0, 3.9, 3.0, 2.0, 1.0, 0.0, 0.0]),
        "undefined": np.full(7, np.nan),
    }
    cal = calibrate(rec, metrics)
    assert cal["tracks"]["n"] == 5  # feature 5 is co-occurring, feature 6 unmatched
    assert cal["tracks"]["spearman"] > 0.95  # not 1: two span-1 features tie
    assert cal["reversed"]["spearman"] < -0.95
    assert cal["tracks"]["mean_by_span"] == pytest.approx({"1": 1.1, "2": 2.1, "3": 2.9, "4": 4.2})
    assert cal["tracks"]["abs_error"] == pytest.approx((0 + 0.2 + 0.1 + 0.1 + 0.2) / 5)
    assert cal["undefined"]["n"] == 0 and np.isnan(cal["undefined"]["spearman"])
    strict = calibrate(rec, metrics, threshold=0.9)
    assert strict["tracks"]["n"] == 2  # strictly above: 0.9 itself is out


def test_summary_columns_are_flat() -> None:
    rec = _recovery()
    columns = summary_columns(rec.summary(), calibrate(rec, {"fc": np.arange(7.0)}))
    assert columns["recovered"] == pytest.approx(3 / 7)  # above 0.9, strictly
    assert columns["recovered_cooccurring"] == 1.0
    assert columns["recovered_single"] == 0.5
    assert columns["span_rho_fc"] > 0.95
