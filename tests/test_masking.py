"""Stochastic layer masking: what is masked, how often, and that targets stay clean."""

from __future__ import annotations

import pytest
import torch

from pipeline.coders import build_coder, coder_config_from_dict
from pipeline.coders.masking import (
    collapse_penalty,
    mask_layers,
    sample_masked_layers,
    step_generator,
)

L, D = 4, 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: intra-op threads only add OpenMP spin-waits (5-10x slower on 2 busy cores).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("rescale", [False, True])
def test_masks_exactly_the_sampled_layers(rescale):
    x = torch.randn(500, L, D, generator=_gen(1)) + 1.0  # no accidental zeros
    out = mask_layers(x, 0.5, rescale, _gen(2))
    masked = out.masked_layer
    assert out.x.shape == x.shape and masked.dtype == torch.long
    scale = L / (L - 1) if rescale else 1.0
    for b in range(len(x)):
        lay = masked[b].item()
        if lay < 0:
            assert torch.equal(out.x[b], x[b])
            continue
        for layer in range(L):
            expect = torch.zeros(D) if layer == lay else x[b, layer] * scale
            assert torch.equal(out.x[b, layer], expect)
    assert torch.equal(out.token_mask, masked >= 0)


def test_masking_rate_and_uniform_layer_choice():
    n, p = 40_000, 0.3
    masked = sample_masked_layers(n, L, p, _gen(3))
    rate = (masked >= 0).float().mean().item()
    assert rate == pytest.approx(p, abs=0.01)
    counts = torch.bincount(masked[masked >= 0], minlength=L).float()
    assert (counts / counts.sum() - 1 / L).abs().max() < 0.02
    assert (sample_masked_layers(n, L, 0.0, _gen(3)) == -1).all()
    assert (sample_masked_layers(n, L, 1.0, _gen(3)) >= 0).all()


def test_masking_is_deterministic_in_seed_and_step():
    cpu = torch.device("cpu")
    a = sample_masked_layers(256, L, 0.5, step_generator(7, 3, cpu))
    b = sample_masked_layers(256, L, 0.5, step_generator(7, 3, cpu))
    c = sample_masked_layers(256, L, 0.5, step_generator(7, 4, cpu))
    d = sample_masked_layers(256, L, 0.5, step_generator(8, 3, cpu))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)


def test_mask_layers_rejects_a_single_layer():
    with pytest.raises(ValueError, match="2 layers"):
        mask_layers(torch.randn(4, 1, D), 0.5, True, _gen())


def _fmx(**over):
    cfg = {
        "kind": "fmxcoder",
        "n_layers": L,
        "d_model": D,
        "n_latents": 32,
        "k": 4,
        "rank": 2,
        "masking_probability": 0.5,
        **over,
    }
    return build_coder(coder_config_from_dict(cfg))


def test_fmxcoder_reconstructs_clean_targets_from_masked_input():
    coder = _fmx()
    x = torch.randn(64, L, D, generator=_gen(4))
    out = coder.training_loss(x, 0, 10, generator=_gen(5))
    masked = mask_layers(x, 0.5, True, _gen(5))
    assert masked.token_mask.any()
    f = coder.encode(masked.x)
    torch.testing.assert_close(out.codes, f)
    recon_clean = (coder.decode(f) - x).pow(2).sum((1, 2)).mean().item()
    recon_masked = (coder.decode(f) - masked.x).pow(2).sum((1, 2)).mean().item()
    assert out.terms["recon"] == pytest.approx(recon_clean, rel=1e-5)
    assert recon_clean != pytest.approx(recon_masked, rel=1e-3)


def test_fmxcoder_default_generator_follows_seed_and_step():
    coder = _fmx()
    x = torch.randn(64, L, D, generator=_gen(4))
    a, b = coder.training_loss(x, 3, 10), coder.training_loss(x, 3, 10)
    c = coder.training_loss(x, 4, 10)
    assert torch.equal(a.codes, b.codes) and not torch.equal(a.codes, c.codes)
    step3 = mask_layers(x, 0.5, True, step_generator(coder.config.seed, 3, x.device))
    torch.testing.assert_close(a.codes, coder.encode(step3.x))


def test_zero_probability_leaves_input_unmasked():
    coder = _fmx(masking_probability=0.0)
    x = torch.randn(32, L, D, generator=_gen(6))
    torch.testing.assert_close(coder.training_loss(x, 0, 10).codes, coder.encode(x))


def test_collapse_penalty_counts_drops_of_clean_active_latents_on_masked_tokens():
    clean = torch.tensor([[2.0, 0.0, 1.0], [3.0, 1.0, 0.0]])
    masked = torch.tensor([[0.5, 4.0, 1.5], [0.0, 0.0, 0.0]], requires_grad=True)
    norms = torch.tensor([1.0, 10.0, 2.0])
    both = collapse_penalty(clean, masked, norms, torch.tensor([True, True]))
    # token 0: latent 0 drops 1.5 (x1); latent 1 inactive on clean; latent 2 rose. token 1: 3 + 10
    assert both.item() == pytest.approx((1.5 + 3.0 + 10.0) / 2)
    first = collapse_penalty(clean, masked, norms, torch.tensor([True, False]))
    assert first.item() == pytest.approx(1.5 / 2)
    first.backward()
    assert torch.equal(masked.grad, torch.tensor([[-0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]))


def test_collapse_term_is_reported_and_trains():
    coder = _fmx(collapse_coefficient=1.0)
    x = torch.randn(64, L, D, generator=_gen(7))
    out = coder.training_loss(x, 0, 10).floats()
    assert out["collapse"] > 0
    no = _fmx().training_loss(x, 0, 10).floats()
    assert no["collapse"] == 0
    assert out["loss"] == pytest.approx(no["loss"] + out["collapse"], rel=1e-5)
