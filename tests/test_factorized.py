"""Layer-axis factorisations: fast paths against dense expansions, and the R = L, G = I case."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from pipeline.coders import build_coder, coder_config_from_dict
from pipeline.coders import factorized as fz
from pipeline.coders.factorized import (
    CPView,
    DenseView,
    PerLatentWeight,
    SharedBasisView,
    SharedBasisWeight,
    build_weight,
    factor_parameters,
    init_tied_,
    sparse_support,
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


# --- every factorisation against its dense expansion (float64, tight tolerances) ----------

# (kind, rank): cp at a rank below d (Gram layer norms) and above L and d (per-layer norms)
EVERY = [("dense", None), ("shared_basis", R), ("per_latent", R), ("cp", R), ("cp", 12)]


def _written_out(w) -> torch.Tensor:
    """Each factorisation's ``[M, L, D]`` weight, built from its definition, not its view."""
    if w.kind == "dense":
        return w.w
    if w.kind == "shared_basis":
        rows = [sum(w.g[layer, r] * w.v[:, r] for r in range(w.rank)) for layer in range(L)]
        return torch.stack(rows, 1)
    if w.kind == "per_latent":
        return torch.stack([w.a[i] @ w.b[i] for i in range(M)])
    atoms = [torch.outer(w.b[:, r], w.c[r]) for r in range(w.rank)]  # cp: [L, D] atoms
    return torch.stack([sum(w.a[i, r] * atoms[r] for r in range(w.rank)) for i in range(M)])


def _sparse_codes() -> torch.Tensor:
    f = torch.zeros(7, M, dtype=torch.float64)
    f[torch.arange(7), torch.arange(7) * 3] = torch.randn(7, generator=_gen(9), dtype=f.dtype)
    f[2, 5] = 0.7
    return f


def _outputs(view, x, f, f_sparse, idx) -> dict[str, torch.Tensor]:
    return {
        "encode": view.encode(x),
        "decode": view.decode(f),
        "decode_sparse": view.decode_sparse(f_sparse, 2),
        "layer_norms": view.layer_norms(),
        "expand_latents": view.expand_latents(idx),
    }


@pytest.mark.parametrize(("kind", "rank"), EVERY)
def test_every_factorisation_equals_its_dense_expansion(kind, rank, monkeypatch):
    monkeypatch.setattr(fz, "SPARSE_DECODE_MAX_DENSITY", 0.1)  # 2 of M = 24 qualify
    w = build_weight(kind, M, L, D, "decoder", rank).double()
    w.init_random_(_gen())
    x = torch.randn(7, L, D, generator=_gen(1), dtype=torch.float64)
    f = torch.randn(7, M, generator=_gen(2), dtype=torch.float64)
    f_sparse, idx = _sparse_codes(), torch.tensor([5, 0, 23, 5])
    assert sparse_support(f_sparse, 2) is not None  # the sparse kernel really runs
    probes = {}
    results = []
    for view in (w.view(), DenseView(_written_out(w))):
        w.zero_grad(set_to_none=True)
        out = _outputs(view, x, f, f_sparse, idx)
        for name, value in out.items():
            probes.setdefault(name, torch.randn(value.shape, generator=_gen(3), dtype=value.dtype))
        sum((probes[n] * v).sum() for n, v in out.items()).backward()
        grads = {n: p.grad.clone() for n, p in w.named_parameters()}
        results.append(({n: v.detach() for n, v in out.items()}, grads))
    (fast, fast_grads), (ref, ref_grads) = results
    torch.testing.assert_close(w.view().expand(), _written_out(w), rtol=1e-12, atol=1e-12)
    for name in ref:
        torch.testing.assert_close(fast[name], ref[name], rtol=1e-10, atol=1e-12, msg=name)
    for name in ref_grads:
        torch.testing.assert_close(
            fast_grads[name], ref_grads[name], rtol=1e-10, atol=1e-12, msg=name
        )


@pytest.mark.parametrize(("kind", "rank"), EVERY)
def test_parameter_count_formula(kind, rank):
    w = build_weight(kind, M, L, D, "decoder", rank)
    assert sum(p.numel() for p in w.parameters()) == factor_parameters(kind, M, L, D, rank)


def test_cp_parameter_count_and_coder_total():
    assert factor_parameters("cp", M, L, D, 12) == 12 * (M + L + D)
    coder = _coder("fmxcoder", rank=12, encoder_factorization="cp", decoder_factorization="cp")
    assert coder.num_parameters() == 2 * 12 * (M + L + D) + M + L * D  # + b_enc, b_dec


def test_cp_load_dense_recovers_a_cp_weight_and_never_worsens_its_start():
    src = _random("cp", rank=R)
    target = src.view().expand()
    dst = build_weight("cp", M, L, D, "decoder", R)
    dst.load_dense_(target)
    torch.testing.assert_close(dst.view().expand(), target, rtol=1e-4, atol=1e-5)
    # a rank too small for the target: ALS sweeps only ever lower the error of the start
    big = _random("dense").view().expand()
    errors = []
    for sweeps in (0, 2, 10):
        dst.load_dense_(big, sweeps=sweeps)
        errors.append(float((dst.view().expand() - big).norm().detach()))
    assert errors[0] >= errors[1] >= errors[2] and errors[2] < errors[0]


@pytest.mark.parametrize(("enc", "dec"), [("cp", "cp"), ("dense", "cp")])
def test_cp_tied_init_is_exact_when_the_encoder_can_hold_the_decoder(enc, dec):
    e, d = build_weight(enc, M, L, D, "encoder", 12), build_weight(dec, M, L, D, "decoder", 12)
    init_tied_(e, d, 0.1, _gen())
    torch.testing.assert_close(e.expand(), d.expand().permute(1, 2, 0), rtol=1e-4, atol=1e-6)
    rms = d.view().layer_norms().pow(2).mean(1).sqrt()
    torch.testing.assert_close(rms, torch.full((M,), 0.1))


def test_cp_rank_may_exceed_n_layers_but_shared_ranks_may_not():
    cfg = {"n_layers": L, "d_model": D, "n_latents": M, "k": 3, "kind": "fmxcoder", "rank": 40}
    both = {"encoder_factorization": "cp", "decoder_factorization": "cp"}
    assert coder_config_from_dict(cfg | both).rank == 40
    with pytest.raises(ValidationError, match=r"rank \(=40\) must be <= n_layers.*shared_basis"):
        coder_config_from_dict(cfg | both | {"encoder_factorization": "shared_basis"})
    with pytest.raises(ValidationError, match="per_latent"):
        coder_config_from_dict(cfg | both | {"decoder_factorization": "per_latent"})


def test_cp_training_never_materialises_dense(monkeypatch):
    monkeypatch.setattr(CPView, "expand", _forbid("expand"))
    monkeypatch.setattr(CPView, "expand_latents", _forbid("expand_latents"))
    coder = _coder(
        "fmxcoder",
        rank=12,
        encoder_factorization="cp",
        decoder_factorization="cp",
        masking_probability=0.5,
        dead_after_tokens=1,
        auxk_k=4,
    )
    x = torch.randn(32, L, D, generator=_gen(7))
    for step in range(3):
        coder.training_loss(x, step, 10).loss.backward()


def _forbid(what: str):
    def raise_(*_args, **_kwargs):
        raise AssertionError(f"dense {what} in the cp fast path")

    return raise_


def test_cp_coder_trains_on_the_tiny_store(tiny_store):
    from pipeline.store.reader import ActivationStore
    from pipeline.training.loader import ActivationLoader

    store = ActivationStore(tiny_store)
    cfg = {
        "kind": "fmxcoder",
        "n_layers": store.n_layers,
        "d_model": store.d_model,
        "n_latents": 64,
        "k": 4,
        "rank": 96,
        "encoder_factorization": "cp",
        "decoder_factorization": "cp",
    }
    coder = build_coder(coder_config_from_dict(cfg))
    optimiser = torch.optim.Adam(coder.parameters(), lr=3e-3)
    loader = ActivationLoader(store, batch_size=128, split="train", seed=0, device="cpu")
    losses = []
    try:
        for epoch in range(3):
            for step, batch in enumerate(loader.epoch(epoch)):
                out = coder.training_loss(batch, step, 100)
                optimiser.zero_grad()
                out.loss.backward()
                optimiser.step()
                losses.append(out.loss.item())
    finally:
        loader.close()
    assert len(losses) >= 10
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3


def test_cp_coder_trains_and_evaluates_end_to_end(tiny_store, tmp_path, monkeypatch):
    import json

    from pipeline import paths
    from pipeline.paths import ReportPaths
    from pipeline.training.manifest import CoderManifest
    from stages import evaluate, train

    monkeypatch.setattr(paths, "data_dir", lambda: tmp_path / "data")  # the floor cache
    coder = {"kind": "fmxcoder", "n_latents": 64, "activation": "topk", "k": 4, "rank": 32}
    coder |= {"encoder_factorization": "cp", "decoder_factorization": "cp"}
    manifest = CoderManifest.model_validate(
        {
            "name": "cp",
            "cache": {"key": tiny_store.name, "root": str(tiny_store.parent)},
            "coder": coder,
            "training": {"tokens": 20 * 128, "batch_size": 128, "lr": 3e-3},
            "run": {"runs_root": str(tmp_path / "runs"), "progress": False},
        }
    )
    (result,) = train.run([(manifest, tmp_path)])
    options = evaluate.EvaluateOptions(
        latents_sampled=2, splice=False, masking_tokens=256, progress=False, device="cpu"
    )
    report = evaluate.run([result.run_dir], tmp_path / "report", options)
    (row,) = json.loads(ReportPaths(report).summary.read_text())["variants"]
    assert row["kind"] == "fmxcoder" and row["parameters"] == 2 * 32 * (64 + 4 + 64) + 64 + 4 * 64
    # cp's floor is a lower bound for any cp decoder of that rank, on the same tokens
    assert 0 < row["floor_fvu"] <= row["fvu"] < 1
