"""Reconstruction and sparsity metrics on hand-built coders with known answers.

``LinearReluCoder`` and ``per_layer_sae`` are imported by the other evaluation tests.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

from pipeline.coders.base import Coder, LossOutput
from pipeline.evaluation.reconstruction import (
    ReconstructionAccumulator,
    SparsityAccumulator,
    evaluate_reconstruction,
)


class LinearReluCoder(Coder):
    """An acausal ReLU crosscoder with explicit weights (a per-layer SAE when block-diagonal)."""

    def __init__(
        self,
        w_enc: Tensor,
        w_dec: Tensor,
        b_enc: Tensor | None = None,
        b_dec: Tensor | None = None,
        layer_of_latent: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.n_layers, self.d_model, self.n_latents = w_enc.shape
        self.w_enc = torch.nn.Parameter(w_enc.float())  # [L, d, m]
        self.w_dec = torch.nn.Parameter(w_dec.float())  # [m, L, d]
        zeros_enc = torch.zeros(self.n_latents)
        self.b_enc = torch.nn.Parameter(zeros_enc if b_enc is None else b_enc.float())
        zeros_dec = torch.zeros(self.n_layers, self.d_model)
        self.b_dec = torch.nn.Parameter(zeros_dec if b_dec is None else b_dec.float())
        self.layer_of_latent = layer_of_latent

    def encode_pre(self, x: Tensor) -> Tensor:
        return torch.einsum("bld,ldm->bm", x, self.w_enc) + self.b_enc

    def activate(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)

    def decode(self, f: Tensor) -> Tensor:
        return torch.einsum("bm,mld->bld", f, self.w_dec) + self.b_dec

    def training_loss(self, x: Tensor, step: int, total_steps: int) -> LossOutput:
        f = self.encode(x)
        loss = (self.decode(f) - x).pow(2).sum(-1).mean()
        return LossOutput(loss, {"mse": float(loss)}, f)

    def layer_contributions(self, x: Tensor, latents: Tensor) -> Tensor:
        return torch.einsum("bld,ldk->blk", x, self.w_enc[:, :, latents])

    def decoder_norms(self) -> Tensor:
        return self.w_dec.norm(dim=-1)

    def encoder_weight(self) -> Tensor:
        return self.w_enc

    def decoder_weight(self) -> Tensor:
        return self.w_dec

    def latent_layer(self) -> Tensor | None:
        return self.layer_of_latent


def per_layer_sae(n_layers: int, d: int, per_layer: int, seed: int = 0) -> LinearReluCoder:
    """Block-diagonal weights: latent i reads and writes only layer ``i // per_layer``."""
    g = torch.Generator().manual_seed(seed)
    m = n_layers * per_layer
    layer = torch.arange(m) // per_layer
    w_enc = torch.randn(n_layers, d, m, generator=g)
    w_dec = torch.randn(m, n_layers, d, generator=g)
    own = torch.nn.functional.one_hot(layer, n_layers).float()  # [m, L]
    return LinearReluCoder(w_enc * own.T[:, None, :], w_dec * own[:, :, None], None, None, layer)


class Identity(LinearReluCoder):
    """Reconstructs perfectly: f = [x, -x] through ReLU, decoded back as f+ - f-."""

    def __init__(self, n_layers: int, d: int) -> None:
        eye = torch.eye(n_layers * d).view(n_layers, d, n_layers * d)
        w_enc = torch.cat([eye, -eye], dim=-1)
        w_dec = torch.cat([eye, -eye], dim=-1).permute(2, 0, 1)
        super().__init__(w_enc, w_dec)


def _batches(
    n_batches: int, batch: int, n_layers: int, d: int, seed: int = 0, offset: float = 5.0
) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    shift = torch.randn(n_layers, d, generator=g) * offset  # a non-zero mean per layer
    return [torch.randn(batch, n_layers, d, generator=g) + shift for _ in range(n_batches)]


def test_fvu_perfect_is_zero_and_mean_prediction_is_one() -> None:
    batches = _batches(5, 64, 3, 8)
    scale = torch.tensor([0.5, 2.0, 10.0])
    perfect, mean_pred = ReconstructionAccumulator(scale), ReconstructionAccumulator(scale)
    mean = torch.cat(batches).mean(0)
    for x in batches:
        perfect.update(x, x.clone())
        mean_pred.update(x, mean.expand_as(x))
    assert np.allclose(perfect.result().fvu, 0.0)
    out = mean_pred.result()
    assert np.allclose(out.fvu, 1.0, atol=1e-9)
    assert out.fvu_mean == pytest.approx(1.0)
    assert out.n_tokens == 5 * 64


def test_fvu_uses_variance_around_the_mean_not_zero() -> None:
    batches = _batches(3, 50, 2, 4)
    acc = ReconstructionAccumulator(torch.ones(2))
    for x in batches:
        acc.update(x, torch.zeros_like(x))  # predicting zero is far worse than the mean
    assert (acc.result().fvu > 5).all()


def test_mse_is_in_raw_units_and_honours_scale() -> None:
    x = torch.zeros(10, 2, 4)
    x_hat = x.clone()
    x_hat[:, 0] += 1.0  # normalised error 1 on every dim of layer 0
    x_hat[:, 1] += 3.0
    acc = ReconstructionAccumulator(torch.tensor([2.0, 0.5]))
    acc.update(x, x_hat)
    mse = acc.result().mse
    assert mse[0] == pytest.approx((1.0 / 2.0) ** 2)
    assert mse[1] == pytest.approx((3.0 / 0.5) ** 2)


def test_keep_mask_drops_special_tokens() -> None:
    x = torch.randn(6, 1, 3)
    x_hat = x.clone()
    x_hat[0] += 100.0  # a "BOS" row with a huge error
    acc = ReconstructionAccumulator(torch.ones(1))
    acc.update(x, x_hat, keep=torch.tensor([False, True, True, True, True, True]))
    assert acc.result().mse[0] == pytest.approx(0.0)
    assert acc.result().n_tokens == 5


def test_evaluate_reconstruction_on_identity_coder() -> None:
    coder = Identity(2, 3)
    recon, sparsity = evaluate_reconstruction(coder, _batches(4, 32, 2, 3, offset=0), torch.ones(2))
    assert recon.fvu_mean == pytest.approx(0.0, abs=1e-10)
    assert sparsity.l0 == pytest.approx(6.0)  # exactly one of (x, -x) is positive per dim
    assert sparsity.n_dead == 0
    assert sparsity.l0_per_layer is None


def test_sparsity_l0_dead_dense_and_per_layer() -> None:
    f = torch.zeros(100, 6)
    f[:, 0] = 1.0  # always on: dense
    f[:5, 1] = 2.0  # 5%: alive, not dense
    f[:11, 2] = 0.5  # 11%: dense
    f[::50, 4] = 1.0  # 2%
    acc = SparsityAccumulator(6, latent_layer=torch.tensor([0, 0, 1, 1, 2, 2]), n_layers=3)
    acc.update(f[:40])
    acc.update(f[40:])
    out = acc.result()
    assert out.l0 == pytest.approx((100 + 5 + 11 + 2) / 100)
    assert out.n_dead == 2 and out.n_dense == 2
    assert out.alive.tolist() == [True, True, True, False, True, False]
    assert np.allclose(out.l0_per_layer, [1.05, 0.11, 0.02])
    assert out.l0_per_layer.sum() == pytest.approx(out.l0)


def test_per_layer_sae_reports_per_layer_l0() -> None:
    coder = per_layer_sae(3, 4, 5)
    _, sparsity = evaluate_reconstruction(coder, _batches(2, 16, 3, 4), torch.ones(3))
    assert sparsity.l0_per_layer is not None and sparsity.l0_per_layer.shape == (3,)
    assert sparsity.l0_per_layer.sum() == pytest.approx(sparsity.l0)
