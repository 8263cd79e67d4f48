"""The multiply-add counts of pipeline.coders.cost against FLOPs counted by torch.

``FlopCounterMode`` sees the aten ops a forward and backward actually dispatch, with their
shapes, so it shares nothing with the formulas but the convention (1 MAC = 2 FLOPs,
elementwise ops free). It has no formula for ``embedding_bag`` (the sparse decode), so the
test gives it one: each gathered row times the row width, forward and each backward.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.coders import build_coder, coder_config_from_dict
from pipeline.coders.cost import macs_per_token, parameter_count

BATCH, L, D = 48, 3, 16


_SIZE = torch.Size
aten = torch.ops.aten
BAG_FLOPS = {
    aten._embedding_bag: lambda w, idx, *a, **k: 2 * _SIZE(idx).numel() * w[-1],
    aten._embedding_bag_forward_only: lambda w, idx, *a, **k: 2 * _SIZE(idx).numel() * w[-1],
    aten._embedding_bag_backward: lambda g, idx, *a, **k: 2 * _SIZE(idx).numel() * g[-1],
    aten._embedding_bag_per_sample_weights_backward: (
        lambda g, w, idx, *a, **k: 2 * _SIZE(idx).numel() * g[-1]
    ),
}


def counted_macs(fn) -> float:
    """Multiply-adds ``fn`` dispatches, per token of the test batch."""
    with FlopCounterMode(display=False, custom_mapping=BAG_FLOPS) as counter:
        fn()
    return counter.get_total_flops() / 2 / BATCH


FMX = {"kind": "fmxcoder", "masking_probability": 0.5, "collapse_coefficient": 0.1}


def fmx(encoder: str, decoder: str, rank: int | None, **fields) -> dict:
    """An fmxcoder with masking and the collapse penalty unless ``fields`` say otherwise."""
    readings = {"encoder_factorization": encoder, "decoder_factorization": decoder}
    return {**FMX, **readings, "rank": rank, **fields}


CONFIGS = {
    "crosscoder topk (sparse decode)": {"kind": "crosscoder"},
    "crosscoder topk k > m/16 (dense)": {"kind": "crosscoder", "k": 20},
    "crosscoder relu": {"kind": "crosscoder", "activation": "relu", "k": None},
    "crosscoder jumprelu": {"kind": "crosscoder", "activation": "jumprelu", "k": None},
    "per-layer SAE": {"kind": "per_layer_sae", "n_latents": None, "latents_per_layer": 40},
    "fmx dense + masking": fmx("dense", "dense", None),
    "fmx per_latent R2": fmx("per_latent", "per_latent", 2),
    "fmx shared_basis R2": fmx("shared_basis", "shared_basis", 2),
    "fmx cp R5": fmx("cp", "cp", 5),
    "fmx cp R24 > d, relu": fmx(
        "cp", "cp", 24, activation="relu", k=None, masking_probability=0, collapse_coefficient=0
    ),
    "fmx enc dense, dec per_latent": fmx("dense", "per_latent", 3),
}


def build(fields: dict):
    """A coder of the test's shape; a None field is left unset."""
    base = {"n_layers": L, "d_model": D, "n_latents": 128, "activation": "topk", "k": 4}
    merged = {key: value for key, value in (base | fields).items() if value is not None}
    return build_coder(coder_config_from_dict(merged))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_step_macs_match_the_flops_torch_counts(name):
    c = build(CONFIGS[name]).train()
    x = torch.randn(BATCH, L, D)

    def step() -> None:
        c.training_loss(x, 5, 10).loss.backward()

    expected = c.macs_per_token(BATCH)
    assert counted_macs(step) == pytest.approx(expected.step, rel=1e-9)


@pytest.mark.parametrize("auxk_k", [None, 4])  # default d/2: dense; 4 <= m/16: sparse
@pytest.mark.parametrize("name", ["crosscoder topk (sparse decode)", "fmx shared_basis R2"])
def test_auxk_step_macs_match(name, auxk_k):
    c = build({**CONFIGS[name], "auxk_k": auxk_k}).train()
    c.tokens_since_fired.fill_(10**9)  # every latent dead: AuxK runs
    c.forget_firing_bound()
    x = torch.randn(BATCH, L, D)
    measured = counted_macs(lambda: c.training_loss(x, 5, 10).loss.backward())
    expected = c.macs_per_token(BATCH)
    assert measured == pytest.approx(expected.step_auxk, rel=1e-9)
    assert expected.step_auxk > expected.step


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encode_and_decode_macs_match(name):
    c = build(CONFIGS[name]).eval()
    x = torch.randn(BATCH, L, D)
    expected = c.macs_per_token(BATCH)
    with torch.no_grad():
        enc, dec = c.encoder_view(), c.decoder_view()  # per_latent builds W here, per step
        f = torch.relu(torch.randn(BATCH, c.n_latents))
        assert counted_macs(lambda: enc.encode(x)) == pytest.approx(expected.encode)
        assert counted_macs(lambda: dec.decode(f)) == pytest.approx(expected.decode)
        k = c.config.k
        if expected.decode_sparse is not None and k * c.config.n_groups <= c.n_latents / 16:
            codes = c.activation(torch.randn(BATCH, c.n_latents))
            measured = counted_macs(lambda: dec.decode_sparse(codes, k))
            assert measured == pytest.approx(expected.decode_sparse)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_count_from_config_matches_the_module(name):
    c = build(CONFIGS[name])
    assert parameter_count(c.config) == c.num_parameters()


def test_per_latent_has_fewer_parameters_but_costs_more_per_step():
    """The issue's point: 5x fewer parameters is not cheaper."""
    dims = {"n_layers": 10, "d_model": 576, "n_latents": 1024, "activation": "topk", "k": 32}
    dense = coder_config_from_dict({"kind": "crosscoder", **dims})
    default = coder_config_from_dict(
        {**dims, **fmx("per_latent", "per_latent", 2, masking_probability=0.25)}
    )
    assert parameter_count(default) * 4 < parameter_count(dense)
    assert macs_per_token(default, 512).step > macs_per_token(dense, 512).step
