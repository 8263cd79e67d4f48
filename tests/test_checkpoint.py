"""Checkpoints: safetensors + JSON round trips, atomic writes, optimizer and RNG state."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from pipeline.coders import build_coder, coder_config_from_dict
from pipeline.training import checkpoint as ckpt

L, D = 3, 8

CONFIGS = [
    {"kind": "per_layer_sae", "latents_per_layer": 8, "activation": "jumprelu"},
    {"kind": "crosscoder", "n_latents": 16, "activation": "relu"},
    {
        "kind": "fmxcoder",
        "n_latents": 16,
        "activation": "batchtopk",
        "k": 2,
        "rank": 2,
        "encoder_factorization": "per_latent",
        "masking_probability": 0.5,
    },
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: intra-op threads only add OpenMP spin-waits (5-10x slower on 2 busy cores).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _coder(cfg: dict):
    return build_coder(coder_config_from_dict({"n_layers": L, "d_model": D, **cfg}))


def _trained(cfg: dict, steps: int = 3):
    coder = _coder(cfg)
    opt = torch.optim.Adam(coder.parameters(), lr=1e-2)
    x = torch.randn(32, L, D, generator=torch.Generator().manual_seed(0))
    for step in range(steps):
        opt.zero_grad()
        coder.training_loss(x, step, 10).loss.backward()
        opt.step()
    return coder, opt, x


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c["kind"])
def test_coder_round_trip(tmp_path, cfg):
    coder, _, x = _trained(cfg)
    ckpt.save_coder(tmp_path / "ck", coder, {"step": 3, "scales": [1.0, 2.0]})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "checksums.json",
        "coder.json",
        "coder.safetensors",
    ]
    raw = (tmp_path / "ck" / "coder.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and json.loads(raw[8 : 8 + header_len])  # safetensors, not pickle
    doc = json.loads((tmp_path / "ck" / "coder.json").read_text())
    assert (
        doc["extra"] == {"step": 3, "scales": [1.0, 2.0]} and doc["config"]["kind"] == cfg["kind"]
    )
    loaded = ckpt.load_coder(tmp_path / "ck")
    assert type(loaded) is type(coder) and loaded.config == coder.config and not loaded.training
    coder.eval()
    for (name, a), b in zip(coder.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(loaded(x), coder(x))
        assert torch.equal(loaded.encode(x), coder.encode(x))


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    coder, _, _ = _trained(CONFIGS[1])
    ckpt.save_coder(tmp_path, coder)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(tensors, path, metadata):
        path.write_bytes(b"partial safetensors bytes")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_write_safetensors", crash)
    with torch.no_grad():
        coder.b_dec.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_coder(tmp_path, coder)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp file either
    fresh = tmp_path / "fresh"
    with pytest.raises(OSError):
        ckpt.save_coder(fresh, coder)
    assert list(fresh.iterdir()) == []
    monkeypatch.undo()
    torch.testing.assert_close(ckpt.load_coder(tmp_path).b_dec, coder.b_dec - 1.0)


def test_mismatched_weights_are_detected(tmp_path):
    a, _, _ = _trained(CONFIGS[1], steps=1)
    ckpt.save_coder(tmp_path / "a", a)
    ckpt.save_coder(tmp_path / "b", _coder(CONFIGS[1]))
    (tmp_path / "a" / "coder.safetensors").write_bytes(
        (tmp_path / "b" / "coder.safetensors").read_bytes()
    )
    with pytest.raises(ValueError, match="mismatch"):
        ckpt.load_coder(tmp_path / "a")


def test_flatten_state_round_trips_nested_structures():
    state = {
        "state": {0: {"step": torch.tensor(3.0), "m": torch.ones(2)}},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0], "x": None}],
    }
    tensors, skeleton = ckpt.flatten_state(state, "optim")
    assert set(tensors) == {"optim.state.0.step", "optim.state.0.m"}
    back = ckpt.unflatten_state(tensors, json.loads(json.dumps(skeleton)))
    assert back["param_groups"] == state["param_groups"] and list(back["state"]) == [0]
    assert torch.equal(back["state"][0]["m"], state["state"][0]["m"])
    with pytest.raises(TypeError, match="without pickle"):
        ckpt.flatten_state({"f": object()})


def test_optimizer_state_resume_is_exact(tmp_path):
    coder, opt, x = _trained(CONFIGS[2])
    tensors, skeleton = ckpt.flatten_state(opt.state_dict(), "optim")
    ckpt.save_coder(tmp_path / "ck", coder)
    ckpt.save_training_state(
        tmp_path / "state.safetensors", tensors, {"optim": skeleton, "step": 3}
    )

    resumed = ckpt.load_coder(tmp_path / "ck").train()
    t2, meta = ckpt.load_training_state(tmp_path / "state.safetensors")
    assert meta["step"] == 3
    opt2 = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    opt2.load_state_dict(ckpt.unflatten_state(t2, meta["optim"]))
    for model, optim in ((coder, opt), (resumed, opt2)):
        for step in range(3, 5):
            optim.zero_grad()
            model.training_loss(x, step, 10).loss.backward()
            optim.step()
    for a, b in zip(coder.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_training_state_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "state.safetensors"
    ckpt.save_training_state(path, {"a": torch.ones(3)}, {"v": 1})

    def crash(tensors, tmp, metadata):
        tmp.write_bytes(b"xx")
        raise RuntimeError("killed")

    monkeypatch.setattr(ckpt, "_write_safetensors", crash)
    with pytest.raises(RuntimeError):
        ckpt.save_training_state(path, {"a": torch.zeros(3)}, {"v": 2})
    monkeypatch.undo()
    tensors, meta = ckpt.load_training_state(path)
    assert meta == {"v": 1} and torch.equal(tensors["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["state.safetensors"]


def test_rng_states_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(5)
    tensors, meta = ckpt.capture_rng_states({"loader": gen})
    ckpt.save_training_state(tmp_path / "rng.safetensors", tensors, {"rng": meta})
    expect = (torch.rand(3), torch.rand(2, generator=gen), random.random(), np.random.rand())
    torch.rand(5), torch.rand(5, generator=gen), random.random(), np.random.rand()
    t2, m2 = ckpt.load_training_state(tmp_path / "rng.safetensors")
    ckpt.restore_rng_states(t2, m2["rng"], {"loader": gen})
    got = (torch.rand(3), torch.rand(2, generator=gen), random.random(), np.random.rand())
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])
    assert got[2:] == expect[2:]
