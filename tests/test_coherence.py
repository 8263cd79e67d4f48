"""Functional coherence, decoder spread and the masking test on hand-built coders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.evaluation.coherence import (
    CoherenceAccumulator,
    MaskingAccumulator,
    decoder_spread,
    effective_layers,
    evaluate_coherence,
    normalised_mean,
)
from tests.test_reconstruction_metrics import LinearReluCoder, per_layer_sae

L, D = 4, 6


def _data(n: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, L, D, generator=torch.Generator().manual_seed(seed))


def _spread_coder() -> LinearReluCoder:
    """Latent 0 reads one direction equally from every layer; latent 1 reads layer 2 only;
    latent 2 reads layers 0 and 1 with weights 0.8 / 0.2 (same input direction)."""
    u = torch.zeros(D)
    u[0] = 1.0
    w_enc = torch.zeros(L, D, 3)
    w_enc[:, :, 0] = u
    w_enc[2, :, 1] = u
    w_enc[0, :, 2], w_enc[1, :, 2] = 0.8 * u, 0.2 * u
    w_dec = torch.zeros(3, L, D)
    w_dec[0] = u  # equal norms on every layer
    w_dec[1, 2] = u
    w_dec[2, 0], w_dec[2, 1] = 3 * u, u
    return LinearReluCoder(w_enc, w_dec)


def _same_on_all_layers(n: int = 200) -> torch.Tensor:
    """Every layer carries the same value, so per-layer contributions are equal."""
    v = torch.randn(n, 1, D, generator=torch.Generator().manual_seed(1))
    return v.expand(n, L, D).clone()


def test_effective_layers_formula() -> None:
    c = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, -5.0, 0.0], [-1.0, -1.0, 0.0, 0.0]]).T
    out = effective_layers(c, dim=0)
    assert out[0] == pytest.approx(4.0)
    assert out[1] == pytest.approx(1.0)  # negative contributions are ignored
    assert torch.isnan(out[2])


def test_per_layer_sae_scores_one() -> None:
    coder = per_layer_sae(L, D, per_layer=5)
    acc = CoherenceAccumulator(coder)
    for x in _data().split(64):
        acc.update(x)
    out = acc.result()
    alive = np.isfinite(out.fc)
    assert alive.sum() > 10
    assert np.allclose(out.fc[alive], 1.0)
    assert out.fc_mean == pytest.approx(1.0)
    assert np.allclose(decoder_spread(coder, torch.ones(L)), 1.0)


def test_equal_contributions_on_every_layer_score_l() -> None:
    coder = _spread_coder()
    acc = CoherenceAccumulator(coder)
    for x in _same_on_all_layers().split(50):
        acc.update(x)
    out = acc.result()
    assert out.fc[0] == pytest.approx(L)
    assert out.fc[1] == pytest.approx(1.0)
    expected = 1.0 / (0.8**2 + 0.2**2)
    assert out.fc[2] == pytest.approx(expected)
    counts, edges = out.histogram(bins=3)
    assert counts.sum() == 3 and edges[0] == 1.0 and edges[-1] == L


def _reference_fc(coder: LinearReluCoder, x: torch.Tensor) -> np.ndarray:
    """The definition, materialising [tokens, L, m]: fine for a test."""
    f = coder.encode(x)
    neff = effective_layers(torch.einsum("bld,ldm->blm", x, coder.w_enc))
    w = torch.where((f > 0) & torch.isfinite(neff), f, 0)
    return ((w * neff.nan_to_num()).sum(0) / w.sum(0)).detach().numpy()


@pytest.mark.parametrize("bias", [0.0, -2.5])  # dense firing, and sparse (the gather path)
def test_streamed_blocks_match_the_reference(bias: float) -> None:
    g = torch.Generator().manual_seed(4)
    w_enc = torch.randn(L, D, 20, generator=g) / 2
    coder = LinearReluCoder(w_enc, torch.randn(20, L, D, generator=g), torch.full((20,), bias))
    x = _data()
    tiny, big = CoherenceAccumulator(coder, block_elements=1), CoherenceAccumulator(coder)
    for batch in x.split(64):
        tiny.update(batch)
        big.update(batch)
    expected = _reference_fc(coder, x)
    assert np.allclose(tiny.result().fc, expected, equal_nan=True)
    assert np.allclose(big.result().fc, expected, equal_nan=True)
    assert 1.0 < big.result().fc_mean < L


def test_mean_is_subtracted_before_contributions() -> None:
    coder = _spread_coder()
    mu = torch.zeros(L, D)
    mu[1:, 0] = 50.0  # a huge mean on layers 1..3 would dominate latent 0 if not removed
    acc = CoherenceAccumulator(coder, mu=mu)
    for x in (_same_on_all_layers() + mu).split(50):
        acc.update(x)
    assert acc.result().fc[0] == pytest.approx(L)


def test_decoder_spread_in_raw_units() -> None:
    coder = _spread_coder()
    d_eff = decoder_spread(coder, torch.ones(L))
    assert d_eff[0] == pytest.approx(L)
    assert d_eff[1] == pytest.approx(1.0)
    assert d_eff[2] == pytest.approx((3 + 1) ** 2 / (9 + 1))
    # Layer 0 scaled up by 3 shrinks its raw-unit norm to match layer 1's.
    assert decoder_spread(coder, torch.tensor([3.0, 1, 1, 1]))[2] == pytest.approx(2.0)


def test_normalised_mean() -> None:
    mean, scale = torch.ones(2, 3), torch.tensor([2.0, 4.0])
    assert torch.equal(normalised_mean(mean, scale, centred=True), torch.zeros(2, 3))
    assert normalised_mean(mean, scale, centred=False)[1, 0] == 4.0


def test_masking_flags_single_layer_latents() -> None:
    coder = _spread_coder()
    acc = MaskingAccumulator(coder)
    for x in _same_on_all_layers().split(40):
        acc.update(x)
    out = acc.result()
    # Latent 0 keeps 3/4 with any one layer masked; latent 1 dies when layer 2 goes;
    # latent 2 keeps only 0.2 of its input when layer 0 goes.
    assert out.min_ratio[0] == pytest.approx(0.75)
    assert out.min_ratio[1] == pytest.approx(0.0)
    assert out.min_ratio[2] == pytest.approx(0.2)
    assert out.worst_layer.tolist() == [0, 2, 0]
    assert out.fragile.tolist() == [False, True, True]
    assert out.share_fragile == pytest.approx(2 / 3)


def test_masking_uses_the_mean_as_zero_and_rescale_option() -> None:
    coder = _spread_coder()
    mu = torch.full((L, D), 7.0)
    rescaled = MaskingAccumulator(coder, mu=mu, rescale=True)
    plain = MaskingAccumulator(coder, mu=mu)
    x = _same_on_all_layers() + mu
    # The bias keeps latent 0 at its centred value: shift the encoder to read centred input.
    coder.b_enc.data = -torch.einsum("ld,ldm->m", mu, coder.w_enc.data)
    rescaled.update(x)
    plain.update(x)
    assert plain.result().min_ratio[0] == pytest.approx(0.75)
    assert rescaled.result().min_ratio[0] == pytest.approx(1.0)


def test_evaluate_coherence_runs_both() -> None:
    fc, masking = evaluate_coherence(per_layer_sae(L, D, 3), _data(128).split(32))
    assert fc.fc_mean == pytest.approx(1.0)
    assert masking is not None and masking.share_fragile == pytest.approx(1.0)


def _all_metrics(coder, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positive, absolute and ablation N_eff of every latent on ``x``."""
    fc, masking = evaluate_coherence(coder, x.split(50))
    assert masking is not None
    return fc.fc, fc.fc_abs, masking.fc_ablation


def test_one_layer_scores_one_and_k_equal_layers_score_k_on_every_metric() -> None:
    positive, absolute, ablation = _all_metrics(_spread_coder(), _same_on_all_layers())
    for values in (positive, absolute, ablation):
        assert values[0] == pytest.approx(L)  # reads every layer equally
        assert values[1] == pytest.approx(1.0)  # reads layer 2 only
        assert values[2] == pytest.approx(1.0 / (0.8**2 + 0.2**2))


def test_sign_cancellation_separates_positive_from_absolute() -> None:
    """Layer 0 pushes +c, layer 1 pushes -c/2: positive N_eff 1, absolute 1.5^2/1.25,
    and ablation 1 (removing layer 1 raises the activation, so it takes nothing away)."""
    u = torch.zeros(D)
    u[0] = 1.0
    w_enc = torch.zeros(L, D, 1)
    w_enc[0, :, 0], w_enc[1, :, 0] = u, -0.5 * u
    coder = LinearReluCoder(w_enc, torch.zeros(1, L, D))
    positive, absolute, ablation = _all_metrics(coder, _same_on_all_layers())
    assert positive[0] == pytest.approx(1.0)
    assert absolute[0] == pytest.approx(1.5**2 / 1.25)
    assert ablation[0] == pytest.approx(1.0)


def test_summary_means_cover_the_new_metrics() -> None:
    fc, masking = evaluate_coherence(_spread_coder(), _same_on_all_layers().split(50))
    expected = (L + 1 + 1 / 0.68) / 3
    assert fc.fc_abs_mean == pytest.approx(expected)
    assert masking.fc_ablation_mean == pytest.approx(expected)
