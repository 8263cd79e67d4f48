"""Trajectory statistics on hand-built decoders with known answers, and on real coders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.coders import build_coder, coder_config_from_dict
from pipeline.evaluation.trajectories import (
    CARRY_RATIO,
    coder_trajectories,
    median_columns,
    quantile_rows,
    raw_weights,
    trajectory_stats,
)

L, D = 10, 64


def _orthonormal(rng: np.random.Generator, n: int, d: int = D) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, n)))
    return q.T


def test_a_rank_one_latent_scores_one_in_its_top_direction() -> None:
    rng = np.random.default_rng(0)
    u = _orthonormal(rng, 1)[0]
    profile = rng.uniform(0.5, 1.5, L) * rng.choice([-1, 1], L)  # sign flips stay rank 1
    t = trajectory_stats((profile[:, None] * u[None])[None])
    assert t.top[0] == pytest.approx([1.0, 1.0, 1.0])
    assert t.carry[0] == L  # the profile's smallest layer is above CARRY_RATIO of its peak
    expected = np.mean(np.sign(profile[:-1] * profile[1:]))
    assert t.adjacent_cos[0] == pytest.approx(expected)


def test_a_known_rotation_gives_its_cosines_and_rank_two() -> None:
    u, v = _orthonormal(np.random.default_rng(1), 2)
    step = np.deg2rad(12.0)
    angles = step * np.arange(L)
    w = np.cos(angles)[:, None] * u + np.sin(angles)[:, None] * v
    t = trajectory_stats(w[None])
    assert t.adjacent_cos[0] == pytest.approx(np.cos(step))
    assert t.first_last_cos[0] == pytest.approx(np.cos(step * (L - 1)))
    assert t.top[0, 1] == pytest.approx(1.0)  # a planar drift is rank 2
    assert t.top[0, 0] < 0.99


def test_random_init_gives_about_k_over_l_and_zero_cosine() -> None:
    # d >> L: the singular values of a Gaussian [L, d] matrix concentrate (Marchenko-Pastur,
    # ratio L/d), so each direction carries about 1/L of the energy
    w = torch.randn(256, L, 4096, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = trajectory_stats(w, chunk=100)  # chunking must not change anything
    edge = (1 + (L / 4096) ** 0.5) ** 2  # largest eigenvalue over the mean, asymptotically
    for j, k in enumerate((1, 2, 3)):
        assert k / L < np.median(t.top[:, j]) < k / L * edge
    assert abs(np.median(t.adjacent_cos)) < 0.01
    assert abs(np.median(t.first_last_cos)) < 0.05
    assert (t.carry == L).all()


def test_carry_counts_layers_above_the_ratio_of_the_peak_and_cosines_skip_the_rest() -> None:
    u, v = _orthonormal(np.random.default_rng(3), 2)
    w = np.zeros((L, D))
    w[2], w[3], w[4] = u, 2 * v, 0.9 * CARRY_RATIO * 2 * u  # layer 4 falls below the ratio
    t = trajectory_stats(w[None])
    assert t.carry[0] == 2
    assert t.adjacent_cos[0] == pytest.approx(0.0)
    assert t.first_last_cos[0] == pytest.approx(0.0)  # layers 2 and 3, not 4
    one = np.zeros((L, D))
    one[5] = u
    single = trajectory_stats(one[None])
    assert single.carry[0] == 1
    assert np.isnan(single.adjacent_cos[0]) and np.isnan(single.first_last_cos[0])
    dead = trajectory_stats(np.zeros((1, L, D)))
    assert np.isnan(dead.top[0]).all() and dead.carry[0] == 0


def _coder(**over):
    cfg = {"n_layers": 4, "d_model": 16, "n_latents": 32, "k": 3, "kind": "crosscoder", **over}
    return build_coder(coder_config_from_dict({k: v for k, v in cfg.items() if v is not None}))


def test_a_per_latent_rank_r_fmxcoder_has_all_its_energy_in_r_directions() -> None:
    for rank in (1, 2):
        coder = _coder(
            kind="fmxcoder",
            encoder_factorization="per_latent",
            decoder_factorization="per_latent",
            rank=rank,
        )
        traj = coder_trajectories(coder, torch.tensor([0.3, 1.0, 2.0, 5.0]))
        for side in ("dec", "enc"):
            assert np.allclose(traj[side].top[:, rank - 1], 1.0)
            assert (traj[side].top[:, 0] < 0.999).all() if rank == 2 else True


def test_raw_weights_undo_the_per_layer_scale() -> None:
    coder = _coder()
    scale = torch.tensor([0.5, 2.0, 4.0, 8.0])
    raw = raw_weights(coder, scale)
    dec = coder.decoder_weight().detach().double()
    enc = coder.encoder_weight().detach().double()
    torch.testing.assert_close(raw["dec"][:, 2], dec[:, 2] / 4.0)
    torch.testing.assert_close(raw["enc"][:, 3], enc[3].T * 8.0)
    # reading raw x: <x_raw * s, W_norm> == <x_raw, W_raw>
    x = torch.randn(4, 16, dtype=torch.float64)
    pre_norm = torch.einsum("ld,ldm->m", x * scale.double()[:, None], enc)
    torch.testing.assert_close(torch.einsum("ld,mld->m", x, raw["enc"]), pre_norm)


def test_per_layer_saes_have_no_trajectory_and_medians_read_nan() -> None:
    sae = _coder(kind="per_layer_sae", latents_per_layer=8, n_latents=None)
    assert coder_trajectories(sae, torch.ones(4)) is None
    cols = median_columns(None, np.ones(32, dtype=bool))
    assert cols and all(np.isnan(v) for v in cols.values())


def test_medians_and_quantiles_use_alive_latents_only() -> None:
    coder = _coder()
    traj = coder_trajectories(coder, torch.ones(4))
    alive = np.zeros(32, dtype=bool)
    alive[:5] = True
    cols = median_columns(traj, alive)
    assert cols["traj_dec_top2"] == pytest.approx(np.median(traj["dec"].top[:5, 1]))
    rows = quantile_rows("x", traj, alive)
    assert {r["n_alive"] for r in rows} == {5}
    assert all(r["p10"] <= r["p50"] <= r["p90"] for r in rows)


def test_normalised_sides_ignore_the_scale_and_cosines_agree() -> None:
    coder = _coder()
    scale = torch.tensor([0.1, 1.0, 3.0, 30.0])
    traj = coder_trajectories(coder, scale)
    plain = trajectory_stats(coder.decoder_weight())
    np.testing.assert_allclose(traj["dec_norm"].top, plain.top)
    # the layer with the smallest scale (the largest raw norms, 10x the next) holds ~99%
    # of the raw decoder energy: 100 / (100 + 1 + 1/9 + 1/900)
    assert (traj["dec"].top[:, 0] > 0.98).all() and (traj["dec_norm"].top[:, 0] < 0.9).all()
    assert (traj["dec"].carry == 1).all() and (traj["dec_norm"].carry == 4).all()
    # a per-layer scale does not turn a vector: where the same layers carry, cosines agree
    mild = coder_trajectories(coder, torch.tensor([1.0, 1.2, 0.9, 1.1]))
    assert (mild["dec"].carry == 4).all()
    np.testing.assert_allclose(mild["dec"].adjacent_cos, mild["dec_norm"].adjacent_cos)
    np.testing.assert_allclose(mild["enc"].first_last_cos, mild["enc_norm"].first_last_cos)
