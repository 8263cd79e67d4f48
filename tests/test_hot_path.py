"""The training step never asks the device a question (no host sync): whether AuxK runs is
decided on the host from a bound on the dead-latent counters, and the loss and gradients
are as they were when ``dead.any()`` was read every step: no AuxK term with no latent dead
(skipped, or computed and exactly zero once the bound has passed the window), the
reference AuxK with some dead."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from pipeline.coders import build_coder, coder_config_from_dict
from pipeline.coders.activations import auxk_loss

L, D = 3, 8
CODER = {"kind": "crosscoder", "n_layers": L, "d_model": D, "n_latents": 32}


def make(activation: str, **over) -> torch.nn.Module:
    k = {"k": 2} if activation in ("topk", "batchtopk") else {}
    config = {**CODER, "activation": activation, **k, "dead_after_tokens": 64, "auxk_k": 4}
    return build_coder(coder_config_from_dict({**config, **over}))


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randn(32, L, D, generator=torch.Generator().manual_seed(seed))


def reference_loss(coder, x: torch.Tensor) -> torch.Tensor:
    """The loss as the step computed it before: AuxK added only when a latent is dead."""
    c = coder.config
    without = build_coder(coder_config_from_dict({**c.model_dump(), "auxk_coefficient": 0.0}))
    without.load_state_dict(coder.state_dict())
    loss = without.training_loss(x, 3, 10).loss
    dead = coder.dead_latents()
    if dead.any():
        enc, dec = coder.encoder_view(), coder.decoder_view()
        pre = enc.encode(x) + coder.b_enc
        f = coder.activation(pre)
        residual = (x - (coder._decode_codes(dec, f) + coder.b_dec)).detach()
        decode = partial(dec.decode_sparse, max_active=c.resolved_auxk_k * c.n_groups)
        loss = loss + c.auxk_coefficient * auxk_loss(
            pre, dead, residual, decode, c.resolved_auxk_k, c.n_groups
        )
    return loss


@pytest.mark.parametrize("activation", ["topk", "relu"])
@pytest.mark.parametrize("state", ["fresh", "past-window", "some-dead"])
def test_loss_and_gradients_as_before(activation, state):
    torch.manual_seed(0)
    coder = make(activation)
    x = batch()
    dead = state == "some-dead"
    if dead:
        coder.tokens_since_fired[::3] = 1000  # a third of the latents dead
    if state == "past-window":  # AuxK computed over no dead latent: exactly zero
        coder._since_fired_bound = 10**9
    assert bool(coder.dead_latents().any()) == dead
    expected = reference_loss(coder, x)
    out = coder.training_loss(x, 3, 10)
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=0)
    if not dead:
        assert out.terms["auxk"] == 0
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in coder.parameters() if p.grad is not None)


def test_no_dead_latent_leaves_the_gradients_unchanged():
    """AuxK computed over no dead latent adds exactly zero to every gradient."""
    torch.manual_seed(0)
    with_auxk, without = make("topk"), make("topk", auxk_coefficient=0.0)
    without.load_state_dict(with_auxk.state_dict())
    x = batch(1)
    for coder in (with_auxk, without):
        coder.training_loss(x, 3, 10).loss.backward()
    for (name, a), b in zip(with_auxk.named_parameters(), without.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "relu", "jumprelu"])
def test_training_step_never_reads_a_tensor_on_the_host(monkeypatch, activation):
    """``bool(tensor)``, ``.item()`` and ``float(tensor)`` wait for the device; a step must
    not (the logged terms stay tensors until a logging step)."""
    coder = make(activation)
    coder.tokens_since_fired[::3] = 1000
    x = batch(2)
    coder.training_loss(x, 0, 10)  # the first step reads the counters' maximum, once

    def refuse(*_args, **_kwargs):
        raise AssertionError("host sync in the training step")

    monkeypatch.setattr(torch.Tensor, "__bool__", refuse)
    monkeypatch.setattr(torch.Tensor, "item", refuse)
    monkeypatch.setattr(torch.Tensor, "__float__", refuse)
    out = coder.training_loss(x, 3, 10)
    out.loss.backward()


def test_the_host_bound_never_misses_a_dead_latent():
    """Over a run whose latents die and revive, AuxK runs on every step with a dead latent
    (the bound is an upper bound) and the bound follows loading."""
    coder = make("topk", dead_after_tokens=96)
    x = batch(3)
    for step in range(12):
        dead = bool(coder.dead_latents().any())
        assert coder.may_have_dead() or not dead
        coder.training_loss(x if step % 5 else -x, step, 12)
    assert coder.may_have_dead()  # 12 x 32 rows recorded: past the 96-token window
    fresh = make("topk", dead_after_tokens=96)
    assert not fresh.may_have_dead()
    fresh.load_state_dict(coder.state_dict())
    assert fresh.may_have_dead() == bool(coder.tokens_since_fired.max() >= 96)
