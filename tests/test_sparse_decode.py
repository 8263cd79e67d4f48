"""The sparse decode (``decode_sparse``, embedding_bag over each row's nonzeros) against the
dense reference (``decode``): same output, same weight gradients, same gradient for the
codes on their support, and the same training gradients end to end for the activations
that use it; plus which path each kind of code takes."""

from __future__ import annotations

import pytest
import torch

from pipeline.coders import build_coder, coder_config_from_dict
from pipeline.coders import factorized as fz
from pipeline.coders.factorized import (
    SPARSE_DECODE_MAX_DENSITY,
    CPView,
    DenseView,
    SharedBasisView,
    build_weight,
    sparse_support,
)

M, L, D, R = 128, 5, 8, 2  # SPARSE_DECODE_MAX_DENSITY * M = 8 nonzeros per row at most
KINDS = ["dense", "shared_basis", "per_latent", "cp"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: intra-op threads only add OpenMP spin-waits (5-10x slower on 2 busy cores).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _codes(counts: list[int], seed: int = 0) -> torch.Tensor:
    """``[len(counts), M]`` codes, row ``b`` with ``counts[b]`` nonzeros of either sign."""
    g = _gen(seed)
    f = torch.zeros(len(counts), M)
    for row, n in enumerate(counts):
        idx = torch.randperm(M, generator=g)[:n]
        f[row, idx] = torch.randn(n, generator=g)
    return f


COUNTS = [0, 1, 5, 6, 3, 6, 0, 2]  # an all-zero row, rows of different counts, max 6


def _weight(kind: str):
    w = build_weight(kind, M, L, D, "decoder", R)
    w.init_random_(_gen(1))
    return w


def _decode_grads(kind: str, f0: torch.Tensor, sparse: bool, max_active: int | None = None):
    """Output and gradients (w.r.t. every factor and f) of a fixed linear loss of x_hat."""
    w = _weight(kind)
    f = f0.clone().requires_grad_(True)
    view = w.view()
    x_hat = view.decode_sparse(f, max_active) if sparse else view.decode(f)
    probe = torch.randn(x_hat.shape, generator=_gen(2))
    (x_hat * probe).sum().backward()
    grads = {name: p.grad for name, p in w.named_parameters()}
    return x_hat.detach(), grads, f.grad


@pytest.mark.parametrize("max_active", [None, 6, 8])  # measured, tight bound, loose bound
@pytest.mark.parametrize("kind", KINDS)
def test_sparse_decode_equals_dense_reference(kind, max_active, monkeypatch):
    f = _codes(COUNTS)
    ref_out, ref_grads, ref_fgrad = _decode_grads(kind, f, sparse=False)
    # the fast path must really run: the reference decode is off limits from here on
    for view in (DenseView, SharedBasisView, CPView):
        monkeypatch.setattr(view, "decode", _forbidden("dense decode"))
    out, grads, fgrad = _decode_grads(kind, f, sparse=True, max_active=max_active)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    assert set(grads) == set(ref_grads) and len(grads) == {"dense": 1, "cp": 3}.get(kind, 2)
    for name, grad in grads.items():
        assert grad is not None, name
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-6)
    # f gets its gradient on its support only (exact for ReLU/TopK/BatchTopK, see factorized)
    support = f != 0
    torch.testing.assert_close(fgrad[support], ref_fgrad[support], rtol=1e-5, atol=1e-6)
    assert (fgrad[~support] == 0).all()
    assert (out[torch.tensor(COUNTS) == 0] == 0).all()  # all-zero rows decode to zero


@pytest.mark.parametrize("kind", KINDS)
def test_all_zero_codes_still_give_the_weights_a_zero_gradient(kind):
    out, grads, fgrad = _decode_grads(kind, torch.zeros(3, M), sparse=True)
    assert (out == 0).all() and (fgrad == 0).all()  # empty support
    ref = _decode_grads(kind, torch.zeros(3, M), sparse=False)[1]
    for name, grad in grads.items():
        assert grad is not None, name  # Adam still steps (momentum) on a zero gradient
        torch.testing.assert_close(grad, ref[name])


def _forbidden(what: str):
    def raise_(*_args, **_kwargs):
        raise AssertionError(f"{what} called")

    return raise_


@pytest.mark.parametrize("kind", KINDS)
def test_dense_codes_take_the_reference_path(kind, monkeypatch):
    monkeypatch.setattr(torch.nn.functional, "embedding_bag", _forbidden("embedding_bag"))
    w = _weight(kind)
    too_many = int(SPARSE_DECODE_MAX_DENSITY * M) + 1
    for f in (torch.randn(4, M, generator=_gen(3)), _codes([too_many, 0, 1])):
        torch.testing.assert_close(w.view().decode_sparse(f), w.view().decode(f))
    # a caller's bound above the threshold also means dense, whatever the codes
    f = _codes([1, 2])
    torch.testing.assert_close(w.view().decode_sparse(f, too_many), w.view().decode(f))


def test_support_pads_short_rows_with_zeros():
    f = _codes(COUNTS)
    idx, vals = sparse_support(f)
    assert idx.shape == vals.shape == (len(COUNTS), max(COUNTS))
    torch.testing.assert_close(f.gather(1, idx), vals)
    assert ((vals != 0).sum(1) == torch.tensor(COUNTS)).all()
    assert sparse_support(torch.randn(2, M)) is None
    assert sparse_support(torch.zeros(0, M)) is None


# --- end to end: a coder's training step, fast path vs reference -------------------------

CODERS = {
    "crosscoder": {"kind": "crosscoder"},
    "fmx-shared": {"kind": "fmxcoder", "rank": R, "masking_probability": 0.5},
    "fmx-per-latent": {
        "kind": "fmxcoder",
        "rank": R,
        "encoder_factorization": "per_latent",
        "decoder_factorization": "per_latent",
    },
    "fmx-cp": {
        "kind": "fmxcoder",
        "rank": 12,
        "encoder_factorization": "cp",
        "decoder_factorization": "cp",
        "masking_probability": 0.5,
    },
}


def _coder(name: str, activation: str, **over):
    cfg = {"n_layers": L, "d_model": D, "n_latents": M, **CODERS[name], **over}
    if activation in ("topk", "batchtopk"):
        cfg |= {"activation": activation, "k": 4}
    else:
        cfg |= {"activation": activation}
    return build_coder(coder_config_from_dict(cfg))


def _step_grads(coder, x, steps: int = 3) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Loss of each step and the gradients of the last (no optimiser: weights fixed)."""
    losses = []
    for step in range(steps):
        coder.zero_grad(set_to_none=True)
        out = coder.training_loss(x, step, 10, generator=_gen(100 + step))
        out.loss.backward()
        losses.append(out.loss.item())
    return losses, {n: p.grad.clone() for n, p in coder.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
@pytest.mark.parametrize("name", list(CODERS))
def test_training_step_matches_dense_reference(name, activation, monkeypatch):
    # dead_after_tokens=1: from step 1 on, AuxK (k_aux = 6 <= 8) decodes sparse codes too
    over = {"dead_after_tokens": 1, "auxk_k": 6}
    x = torch.randn(32, L, D, generator=_gen(4))
    monkeypatch.setattr(fz, "SPARSE_DECODE_MAX_DENSITY", 0.0)  # every decode dense
    ref_losses, ref = _step_grads(_coder(name, activation, **over), x)
    monkeypatch.undo()
    # BatchTopK rows hold up to a few times k nonzeros here: let every row qualify
    monkeypatch.setattr(fz, "SPARSE_DECODE_MAX_DENSITY", 0.25)
    for view in (DenseView, SharedBasisView, CPView):  # and no dense decode: the fast path must run
        monkeypatch.setattr(view, "decode", _forbidden("dense decode"))
    losses, grads = _step_grads(_coder(name, activation, **over), x)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert set(grads) == set(ref)
    for n, grad in grads.items():
        torch.testing.assert_close(grad, ref[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", list(CODERS))
def test_dense_relu_codes_take_the_reference_path(name, monkeypatch):
    monkeypatch.setattr(torch.nn.functional, "embedding_bag", _forbidden("embedding_bag"))
    coder = _coder(name, "relu")
    x = torch.randn(32, L, D, generator=_gen(5))
    assert (coder.encode(x) != 0).sum(1).max() > SPARSE_DECODE_MAX_DENSITY * M  # ~half fire
    _step_grads(coder, x, steps=1)


@pytest.mark.parametrize("name", list(CODERS))
def test_jumprelu_always_takes_the_reference_path(name, monkeypatch):
    # JumpReLU's threshold gradient reads dL/df where f == 0, which the sparse path does not
    # give: even codes sparse enough for it must be decoded densely
    monkeypatch.setattr(fz, "SPARSE_DECODE_MAX_DENSITY", 1.0)
    monkeypatch.setattr(torch.nn.functional, "embedding_bag", _forbidden("embedding_bag"))
    _step_grads(_coder(name, "jumprelu"), torch.randn(32, L, D, generator=_gen(5)), steps=1)


def test_coder_decode_is_sparse_without_gradient_and_dense_with(monkeypatch):
    coder = _coder("crosscoder", "topk")
    x = torch.randn(16, L, D, generator=_gen(6))
    with torch.no_grad():
        f = coder.encode(x)
        ref = coder.decode(f)
        monkeypatch.setattr(DenseView, "decode", _forbidden("dense decode"))
        torch.testing.assert_close(coder.decode(f), ref)
        torch.testing.assert_close(coder(x), ref)
    monkeypatch.undo()
    monkeypatch.setattr(torch.nn.functional, "embedding_bag", _forbidden("embedding_bag"))
    f = f.clone().requires_grad_(True)  # a caller asking for dL/df gets it everywhere
    coder.decode(f).sum().backward()
    assert (f.grad[f == 0] != 0).any()
