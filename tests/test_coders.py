"""Coders: training on planted sparse data, activations, per-layer structure, configs."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from pipeline.coders import (
    CODERS,
    Crosscoder,
    Fmxcoder,
    PerLayerSAE,
    build_coder,
    coder_config_from_dict,
)
from pipeline.coders.activations import BatchTopK, JumpReLU

L, D = 4, 16

ACTIVATIONS = {
    "relu": {"activation": "relu", "l1_coefficient": 0.1},
    "topk": {"activation": "topk", "k": 4},
    "batchtopk": {"activation": "batchtopk", "k": 4},
    "jumprelu": {
        "activation": "jumprelu",
        "l0_coefficient": 0.1,
        "jumprelu_bandwidth": 0.1,
        "jumprelu_init_threshold": 0.1,
    },
}
KINDS = {
    "per_layer_sae": {"kind": "per_layer_sae", "latents_per_layer": 32},
    "crosscoder": {"kind": "crosscoder", "n_latents": 64},
    "fmxcoder": {
        "kind": "fmxcoder",
        "n_latents": 64,
        "rank": 2,
        "masking_probability": 0.25,
        "collapse_coefficient": 0.1,
    },
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: intra-op threads only add OpenMP spin-waits (5-10x slower on 2 busy cores).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(kind: str, activation: str = "topk", **over) -> torch.nn.Module:
    d = {"n_layers": L, "d_model": D, **KINDS[kind], **ACTIVATIONS[activation], **over}
    return build_coder(coder_config_from_dict(d))


@pytest.fixture(scope="module")
def planted() -> torch.Tensor:
    """Tokens = 3 of 32 features with magnitudes in [0.5, 1.5]; features span all layers with
    a rank-2 layer profile (neighbouring layers correlate), E||x|| ~ sqrt(L*d)."""
    g = torch.Generator().manual_seed(0)
    n, n_feat, k = 4096, 32, 3
    basis = torch.linalg.qr(torch.randn(L, 2, generator=g))[0]
    feats = torch.einsum("lr,frd->fld", basis, torch.randn(n_feat, 2, D, generator=g))
    feats = feats / feats.flatten(1).norm(dim=1)[:, None, None] * (L * D / k) ** 0.5
    idx = torch.rand(n, n_feat, generator=g).argsort(1)[:, :k]
    codes = torch.zeros(n, n_feat).scatter(1, idx, torch.rand(n, k, generator=g) + 0.5)
    return (codes @ feats.flatten(1)).view(n, L, D)


def fvu(coder, x: torch.Tensor) -> float:
    coder.eval()
    with torch.no_grad():
        err = (coder(x) - x).pow(2).sum()
    coder.train()
    return (err / (x - x.mean(0)).pow(2).sum()).item()


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_training_reduces_loss_and_reaches_low_fvu(kind, activation, planted):
    coder = make(kind, activation)
    opt = torch.optim.Adam(coder.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    fvu0, losses = fvu(coder, planted), []
    for step in range(100):
        batch = planted[torch.randint(0, len(planted), (256,), generator=g)]
        out = coder.training_loss(batch, step, 100)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert {"loss", "recon", "sparsity", "auxk", "collapse", "l0", "mse", "fvu"} <= set(out.terms)
    assert out.codes is not None and out.codes.shape == (256, coder.n_latents)
    assert sum(losses[-10:]) / 10 < 0.3 * losses[0]
    # each per-layer SAE sees 32 features squeezed into d=16 with k=4: it converges slower
    assert fvu0 > 0.9 and fvu(coder, planted) < (0.25 if kind == "per_layer_sae" else 0.1)


@pytest.mark.parametrize("kind", list(KINDS))
def test_same_seed_same_coder_and_losses(kind, planted):
    a, b = make(kind), make(kind)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb)
    assert a.training_loss(planted[:64], 3, 10).terms == b.training_loss(planted[:64], 3, 10).terms
    assert not torch.equal(make(kind, seed=1).decoder_weight(), a.decoder_weight())


@pytest.mark.parametrize("kind", list(KINDS))
def test_init_encoder_is_decoder_transposed_and_small(kind):
    coder = make(kind)
    torch.testing.assert_close(coder.encoder_weight(), coder.decoder_weight().permute(1, 2, 0))
    norms = coder.decoder_norms()
    own = norms[norms > 0] if kind == "per_layer_sae" else norms
    assert own.pow(2).mean().sqrt().item() == pytest.approx(0.1, rel=1e-4)
    assert coder.b_enc.abs().sum() == 0 and coder.b_dec.abs().sum() == 0


def test_registry_names():
    assert set(CODERS) == {"per_layer_sae", "crosscoder", "fmxcoder"}
    assert type(make("crosscoder")) is Crosscoder and type(make("fmxcoder")) is Fmxcoder


def test_per_layer_sae_latents_own_one_layer(planted):
    coder = make("per_layer_sae")
    assert isinstance(coder, PerLayerSAE) and coder.n_latents == L * 32
    layer = coder.latent_layer()
    assert torch.equal(layer, torch.arange(L).repeat_interleave(32))
    off = layer[:, None] != torch.arange(L)[None, :]
    norms = coder.decoder_norms()
    assert (norms[off] == 0).all() and (norms[~off] > 0).all()
    latents = torch.tensor([0, 31, 32, 77, 127])
    c = coder.layer_contributions(planted[:8], latents)
    assert c.shape == (8, L, 5)
    assert (c[:, off[latents].T] == 0).all()
    torch.testing.assert_close(c.sum(1), coder.encode_pre(planted[:8])[:, latents])
    w = coder.encoder_weight()  # [L, d, m]: zero off the diagonal blocks
    assert (w.permute(2, 0, 1)[off] == 0).all()


def test_per_layer_sae_topk_is_per_layer(planted):
    coder = make("per_layer_sae", k=2)
    f = coder.encode(planted[:16]).view(16, L, 32)
    assert ((f > 0).sum(-1) <= 2).all() and (f > 0).sum() > 16 * L


@pytest.mark.parametrize("kind", ["crosscoder", "fmxcoder"])
def test_layer_contributions_add_up_to_pre_activation(kind, planted):
    coder = make(kind)
    with torch.no_grad():
        coder.b_enc.normal_()
    latents = torch.tensor([3, 0, 63])
    c = coder.layer_contributions(planted[:8], latents)
    expect = coder.encode_pre(planted[:8])[:, latents] - coder.b_enc[latents]
    torch.testing.assert_close(c.sum(1), expect, rtol=1e-4, atol=1e-4)


def test_topk_and_batchtopk_counts(planted):
    x = planted[:32]
    f = make("crosscoder", "topk").encode(x)
    assert ((f > 0).sum(-1) == 4).all()
    f = make("crosscoder", "batchtopk").train().encode(x)
    assert (f > 0).sum() == 4 * 32 and not ((f > 0).sum(-1) == 4).all()


def test_batchtopk_uses_tracked_threshold_in_eval(planted):
    coder = make("crosscoder", "batchtopk", batchtopk_threshold_momentum=0.5)
    act = coder.activation
    assert isinstance(act, BatchTopK)
    f_train = coder.training_loss(planted[:64], 0, 10).codes
    assert act.threshold_updates.item() == 1
    assert act.threshold.item() == pytest.approx(f_train[f_train > 0].min().item())
    with torch.no_grad():
        act.threshold.fill_(0.05)
    coder.eval()
    pre = coder.encode_pre(planted[:64])
    f = coder.encode(planted[:64])
    torch.testing.assert_close(f, pre * (pre > 0.05))
    assert not ((f > 0).sum(-1) == 4).all()  # per-token count varies: not TopK


def test_jumprelu_threshold_gets_gradient(planted):
    coder = make("crosscoder", "jumprelu")
    act = coder.activation
    assert isinstance(act, JumpReLU)
    coder.training_loss(planted[:256], 10, 10).loss.backward()
    grad = act.log_threshold.grad
    assert grad is not None and grad.abs().sum() > 0
    # the L0 term alone pushes every threshold up (gradient negative): pre near theta exists
    act.log_threshold.grad = None
    act.l0_penalty(coder.encode_pre(planted[:256])).backward()
    assert (act.log_threshold.grad <= 0).all() and (act.log_threshold.grad < 0).any()


def test_sparsity_coefficient_ramps_linearly():
    coder = make("crosscoder", "relu", sparsity_warmup_fraction=0.1)
    assert coder.sparsity_coefficient(0, 1000) == 0
    assert coder.sparsity_coefficient(50, 1000) == pytest.approx(0.05)
    assert coder.sparsity_coefficient(500, 1000) == pytest.approx(0.1)
    assert make("crosscoder").sparsity_coefficient(0, 1000) == 0  # topk: no penalty


def test_relu_sparsity_term_is_l1_times_decoder_norm_sum(planted):
    coder = make("crosscoder", "relu")
    x = planted[:32]
    out = coder.training_loss(x, 5, 10)
    f = coder.encode(x)
    expect = (f * coder.decoder_weight().norm(dim=-1).sum(1)).sum(-1).mean()
    assert out.terms["sparsity"] == pytest.approx(expect.item(), rel=1e-5)


def test_dead_latent_tracking_and_auxk(planted):
    coder = make("crosscoder", "topk", k=1, dead_after_tokens=64, auxk_k=8)
    x = planted[:32]
    out = coder.training_loss(x, 0, 10)
    fired = (out.codes > 0).any(0)
    assert torch.equal(coder.tokens_since_fired, torch.where(fired, 0, 32))
    assert out.terms["auxk"] == 0
    coder.training_loss(x, 1, 10)
    out = coder.training_loss(x, 2, 10)  # unfired latents reached 64 tokens: dead
    assert coder.dead_latents().sum() > 0 and out.terms["auxk"] > 0
    out.loss.backward()
    dead = coder.dead_latents()
    grad = coder.encoder.w.grad.flatten(1).norm(dim=1)
    assert (grad[dead] > 0).any()  # AuxK trains dead latents


CONFIG_ERRORS = [
    ({"kind": "crosscoder", "n_latents": 8, "k": 2, "bogus": 1}, "bogus"),
    ({"kind": "fmxcoder", "n_latents": 8, "k": 2, "rank": 5}, "rank"),
    ({"kind": "fmxcoder", "n_latents": 8, "k": 2}, "rank"),
    (
        {
            "kind": "fmxcoder",
            "n_latents": 8,
            "k": 2,
            "encoder_factorization": "dense",
            "decoder_factorization": "dense",
            "rank": 2,
        },
        "rank",
    ),
    ({"kind": "crosscoder", "n_latents": 8, "k": 9}, "k"),
    ({"kind": "per_layer_sae", "latents_per_layer": 8, "k": 9}, "k"),
    ({"kind": "crosscoder", "n_latents": 8}, "k"),
    ({"kind": "crosscoder", "n_latents": 8, "k": 2, "l1_coefficient": 3.0}, "l1_coefficient"),
    ({"kind": "crosscoder", "n_latents": 8, "activation": "relu", "k": 2}, "k"),
    ({"kind": "crosscoder", "n_latents": 8, "k": 2, "auxk_k": 9}, "auxk_k"),
    (
        {"kind": "fmxcoder", "n_latents": 8, "k": 2, "rank": 2, "collapse_coefficient": 1.0},
        "collapse_coefficient",
    ),
    (
        {"kind": "fmxcoder", "n_latents": 8, "k": 2, "rank": 2, "masking_probability": 1.5},
        "masking_probability",
    ),
    (
        {
            "kind": "fmxcoder",
            "n_layers": 1,
            "n_latents": 8,
            "k": 2,
            "rank": 1,
            "masking_probability": 0.5,
        },
        "masking_probability",
    ),
    ({"kind": "crosscoder", "n_latents": 0, "k": 2}, "n_latents"),
    ({"kind": "autoencoder", "n_latents": 8, "k": 2}, "kind"),
]


@pytest.mark.parametrize(("update", "field"), CONFIG_ERRORS)
def test_config_validation_names_the_field(update, field):
    d = {"n_layers": L, "d_model": D, **update}
    with pytest.raises(ValidationError, match=rf"\b{field}\b"):
        coder_config_from_dict(d)


def test_config_is_frozen_and_round_trips():
    cfg = coder_config_from_dict(
        {"kind": "fmxcoder", "n_layers": L, "d_model": D, "n_latents": 8, "k": 2, "rank": 2}
    )
    with pytest.raises(ValidationError):
        cfg.rank = 3
    assert coder_config_from_dict(cfg.model_dump(mode="json")) == cfg
