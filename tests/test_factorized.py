"""Layer-axis factorisations: fast paths against dense expansions, and the R = L, G = I case."""

from __future__ import annotations

import pytest
import torch

from pipeline.coders import build_coder, coder_config_from_dict
from pipeline.coders.factorized import (
    DenseView,
    PerLatentWeight,
    SharedBasisView,
    SharedBasisWeight,
    build_weight,
    init_tied_,
)

M, L, D, R = 24, 5, 8, 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: intra-op threads only add OpenMP spin-waits (5-10x slower on 2 busy cores).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random(kind: str, rank: int = R, role: str = "decoder"):
    w = build_weight(kind, M, L, D, role, rank)
    w.init_random_(_gen())
    return w


def _assert_views_agree(fast, ref, x, f):
    torch.testing.assert_close(fast.encode(x), ref.encode(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.decode(f), ref.decode(f), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.layer_norms(), ref.layer_norms(), rtol=1e-4, atol=1e-5)
    idx = torch.tensor([5, 0, 23])
    torch.testing.assert_close(fast.expand_latents(idx), ref.expand_latents(idx))


def test_shared_basis_fast_path_equals_dense_expansion():
    w = _random("shared_basis")
    x, f = torch.randn(7, L, D, generator=_gen(1)), torch.randn(7, M, generator=_gen(2))
    reference = torch.einsum("lr,ird->ild", w.g, w.v)  # written out, independent of the view
    assert isinstance(w.view(), SharedBasisView)
    torch.testing.assert_close(w.view().expand(), reference)
    _assert_views_agree(w.view(), DenseView(reference), x, f)


def test_per_latent_fast_path_equals_expansion():
    w = _random("per_latent")
    x, f = torch.randn(7, L, D, generator=_gen(1)), torch.randn(7, M, generator=_gen(2))
    reference = torch.stack([w.a[i] @ w.b[i] for i in range(M)])  # [M, L, D], one per latent
    torch.testing.assert_close(w.view().expand(), reference)
    pre = torch.einsum("bld,ild->bi", x, reference)
    torch.testing.assert_close(w.view().encode(x), pre, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        w.view().decode(f), torch.einsum("bi,ild->bld", f, reference), rtol=1e-4, atol=1e-5
    )


def test_expand_orientation_by_role():
    enc, dec = _random("shared_basis", role="encoder"), _random("shared_basis")
    assert enc.expand().shape == (L, D, M) and dec.expand().shape == (M, L, D)
    torch.testing.assert_close(enc.expand(), dec.expand().permute(1, 2, 0))


def test_parameter_counts_shrink_with_rank():
    assert sum(p.numel() for p in _random("dense").parameters()) == M * L * D
    assert sum(p.numel() for p in _random("shared_basis").parameters()) == L * R + M * R * D
    assert sum(p.numel() for p in _random("per_latent").parameters()) == M * R * (L + D)


@pytest.mark.parametrize("kind", ["shared_basis", "per_latent"])
def test_load_dense_is_exact_for_low_rank_weights(kind):
    src = _random(kind)
    dst = build_weight(kind, M, L, D, "decoder", R)
    dst.load_dense_(src.view().expand())
    torch.testing.assert_close(dst.view().expand(), src.view().expand(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "shared_basis", "per_latent"])
def test_rescale_sets_rms_layer_norm(kind):
    w = _random(kind)
    w.rescale_(0.1)
    rms = w.view().layer_norms().pow(2).mean(1).sqrt()
    torch.testing.assert_close(rms, torch.full((M,), 0.1))


@pytest.mark.parametrize(
    ("enc", "dec"),
    [("dense", "shared_basis"), ("dense", "per_latent"), ("shared_basis", "shared_basis")],
)
def test_tied_init_across_parameterisations(enc, dec):
    e, d = build_weight(enc, M, L, D, "encoder", R), build_weight(dec, M, L, D, "decoder", R)
    init_tied_(e, d, 0.1, _gen())
    torch.testing.assert_close(e.expand(), d.expand().permute(1, 2, 0), rtol=1e-4, atol=1e-6)


def _coder(kind: str, **over):
    cfg = {"n_layers": L, "d_model": D, "n_latents": M, "k": 3, "kind": kind, **over}
    return build_coder(coder_config_from_dict(cfg))


def test_shared_basis_with_identity_basis_equals_dense_crosscoder():
    fmx = _coder("fmxcoder", rank=L)
    cross = _coder("crosscoder")
    with torch.no_grad():
        for part in ("encoder", "decoder"):
            sb: SharedBasisWeight = getattr(fmx, part)
            sb.g.copy_(torch.eye(L))
            sb.v.normal_(generator=_gen(3 if part == "encoder" else 4))
            getattr(cross, part).w.copy_(sb.v)  # W[i, l] = V[i, l] when G = I
        for coder in (fmx, cross):
            coder.b_enc.copy_(torch.linspace(-1, 1, M))
            coder.b_dec.copy_(torch.linspace(-1, 1, L * D).view(L, D))
    x = torch.randn(9, L, D, generator=_gen(5))
    torch.testing.assert_close(fmx.encode_pre(x), cross.encode_pre(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fmx.encode(x), cross.encode(x), rtol=1e-5, atol=1e-5)
    f = cross.encode(x)
    torch.testing.assert_close(fmx.decode(f), cross.decode(f), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fmx.decoder_norms(), cross.decoder_norms())
    lat = torch.tensor([1, 7])
    torch.testing.assert_close(fmx.layer_contributions(x, lat), cross.layer_contributions(x, lat))
    torch.testing.assert_close(fmx.encoder_weight(), cross.encoder_weight())


@pytest.mark.parametrize("kind", ["shared_basis", "per_latent"])
def test_coder_norms_and_contributions_match_expansion(kind):
    coder = _coder("fmxcoder", rank=R, encoder_factorization=kind, decoder_factorization=kind)
    x = torch.randn(6, L, D, generator=_gen(6))
    w_enc, w_dec = coder.encoder_weight(), coder.decoder_weight()
    assert w_enc.shape == (L, D, M) and w_dec.shape == (M, L, D)
    torch.testing.assert_close(coder.decoder_norms(), w_dec.norm(dim=-1), rtol=1e-4, atol=1e-6)
    lat = torch.tensor([0, 11, 23])
    ref = torch.einsum("bld,ldk->blk", x, w_enc[:, :, lat])
    torch.testing.assert_close(coder.layer_contributions(x, lat), ref, rtol=1e-4, atol=1e-5)


def test_shared_basis_training_never_materialises_dense(monkeypatch):
    def forbidden(*_args, **_kwargs):
        raise AssertionError("dense expansion in the shared_basis fast path")

    monkeypatch.setattr(SharedBasisView, "expand", forbidden)
    monkeypatch.setattr(SharedBasisView, "expand_latents", forbidden)
    coder = _coder(
        "fmxcoder",
        rank=R,
        k=None,
        activation="relu",
        masking_probability=0.5,
        collapse_coefficient=0.1,
        dead_after_tokens=1,
        auxk_k=4,
    )
    x = torch.randn(32, L, D, generator=_gen(7))
    for step in range(3):  # step >= 1 has dead latents, so AuxK runs too
        coder.training_loss(x, step, 10).loss.backward()
    coder.eval()
    coder(x)


def test_per_latent_materialises_once_per_step(monkeypatch):
    calls = []
    original = PerLatentWeight.view

    def counting(self):
        calls.append(self.role)
        return original(self)

    monkeypatch.setattr(PerLatentWeight, "view", counting)
    coder = _coder(
        "fmxcoder",
        rank=R,
        k=None,
        activation="relu",
        encoder_factorization="per_latent",
        decoder_factorization="per_latent",
        masking_probability=0.5,
        collapse_coefficient=0.1,
    )
    calls.clear()  # initialisation expands too; count only the training step
    coder.training_loss(torch.randn(16, L, D, generator=_gen(8)), 0, 10)
    assert sorted(calls) == ["decoder", "encoder"]
