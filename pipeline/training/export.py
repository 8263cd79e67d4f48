"""Export trained coders into the on-disk formats of SAELens and dictionary_learning.

Both exports fold our per-layer normalisation ``x_norm = (x - centre * mean) * scale`` into
the weights, so the exported dictionary takes and returns raw activations:
``W_enc' = scale * W_enc``, ``b_enc' = b_enc - sum_l scale_l (centre * mean_l) W_enc[l]``,
``W_dec' = W_dec / scale``, ``b_dec' = b_dec / scale + centre * mean``. Pre-activations are
unchanged by the fold, so TopK choices and JumpReLU/BatchTopK thresholds carry over exactly.

* ``saelens`` (per-layer SAE runs): one folder per layer, named by its hook, holding
  ``cfg.json`` + ``sae_weights.safetensors`` as SAELens 6.x writes them, for
  ``sae_lens.SAE.load_from_disk(folder)``. relu -> ``standard``, topk -> ``topk``,
  jumprelu -> ``jumprelu``, batchtopk -> ``jumprelu`` with the tracked threshold (that is
  how BatchTopK runs at inference; SAELens does the same conversion).
* ``dictionary_learning`` (crosscoders, fmxcoders; factorised weights expanded to dense):
  the layout of ``CrossCoder`` / ``BatchTopKCrossCoder`` in the maintained crosscoder fork
  of dictionary_learning (github.com/jkminder/dictionary_learning; the ``dictionary-learning``
  0.1.0 wheel on PyPI has no crosscoder class): ``model.safetensors`` with
  ``encoder.weight [L, d, m]``, ``encoder.bias [m]``, ``decoder.weight [L, m, d]``,
  ``decoder.bias [L, d]`` and the class's buffers, ``config.json`` with its constructor
  arguments (``Class.from_pretrained(folder, from_hub=True)`` reads both), and
  ``fmxcoders.json`` with the provenance. relu -> ``CrossCoder``; batchtopk ->
  ``BatchTopKCrossCoder`` (code normalisation NONE, so its threshold compares raw codes as
  ours does); topk -> ``BatchTopKCrossCoder`` too, with a threshold estimated on the run's
  training activations (``topk_threshold``) so that its ``forward`` fires k latents per token
  on average, as dictionary_learning's BatchTopK runs at inference; exact per-token TopK is
  its ``encode(x, use_threshold=False)`` on one token at a time.

``saelens_forward`` and ``dictionary_learning_forward`` re-implement each library's
inference forward from the exported files alone, so the tests check an export without
installing either library (bench/export_roundtrip.py checks with the real ones).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from pipeline.training.run_record import RunRecord

FORMATS = ("saelens", "dictionary_learning")
SAELENS_VERSION = "6.54.12"  # the SAELens whose layout this writes (bench/export_roundtrip.py)
_CODE_NORMALISATION_ID = {"CROSSCODER": 1, "NONE": 4}  # dictionary_learning's enum values
CALIBRATION_TOKENS = 65_536  # at most this many training tokens set a TopK export's threshold


class ExportError(ValueError):
    """A run that the chosen format cannot represent; the message says which and why."""


@dataclass(frozen=True)
class Folded:
    """Dense weights in raw activation units."""

    W_enc: Tensor  # [L, d, m]
    b_enc: Tensor  # [m]
    W_dec: Tensor  # [L, m, d]
    b_dec: Tensor  # [L, d]


@torch.no_grad()
def fold(W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, record: RunRecord) -> Folded:
    """Fold the record's normalisation into dense ``[L, d, m]`` / ``[L, m, d]`` weights."""
    scale = record.scale.double()
    shift = record.mean.double() * float(record.centre)  # [L, d]
    w_enc = W_enc.double() * scale[:, None, None]
    b_enc_raw = b_enc.double() - torch.einsum("ld,ldm->m", shift, w_enc)
    w_dec = W_dec.double() / scale[:, None, None]
    b_dec_raw = b_dec.double() / scale[:, None] + shift
    return Folded(w_enc.float(), b_enc_raw.float(), w_dec.float(), b_dec_raw.float())


def _activation_threshold(coder: Any) -> Tensor | None:
    """The inference threshold per latent (JumpReLU, tracked BatchTopK), or None."""
    act = coder.activation
    kind = coder.config.activation
    if kind == "jumprelu":
        return act.threshold.detach().float()
    if kind == "batchtopk" and bool((act.threshold_updates > 0).all()):
        group = coder.n_latents // act.n_groups
        return act.threshold.detach().float().repeat_interleave(group)
    return None


def _inference_kind(coder: Any) -> str:
    """relu, topk or threshold (BatchTopK before any training batch runs as TopK)."""
    kind = coder.config.activation
    if kind in ("jumprelu", "batchtopk") and _activation_threshold(coder) is not None:
        return "threshold"
    return "topk" if kind in ("topk", "batchtopk") else kind


def _safe_folder(hook: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", hook)


# The Hugging Face model each packaged GGUF was quantised from, its file and quantisation:
# no TransformerLens name loads these quantised weights, so the export names all three.
PACKAGED_ORIGINS = {
    "smollm2-135m": (
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "Q4_1",
    ),
    "gemma3-270m": ("google/gemma-3-270m", "gemma-3-270m-q4_k_m.gguf", "Q4_K_M"),
}


def model_identity(model: dict[str, Any]) -> dict[str, Any]:
    """SAELens's ``model_name`` for a record's model section, with what else identifies it:
    a hub name as is (TransformerLens loads it), a packaged GGUF as its HF origin + file +
    quantisation, anything else by its own name."""
    name = str(model.get("name") or "")
    identity = model.get("identity") if isinstance(model.get("identity"), dict) else {}
    if model.get("source") == "packaged" and name in PACKAGED_ORIGINS:
        hf_id, gguf, quantisation = PACKAGED_ORIGINS[name]
        return {
            "model_name": hf_id,
            "gguf_file": gguf,
            "quantisation": quantisation,
            "weights_package": identity.get("package"),
        }
    if model.get("source") == "hub":
        return {"model_name": name, "revision": model.get("revision")}
    return {
        "model_name": name,
        **({"weights_sha256": identity["sha256"]} if "sha256" in identity else {}),
    }


def harvest_context(manifest: dict[str, Any] | None) -> dict[str, Any]:
    """SAELens's ``context_size``, ``prepend_bos`` and ``dataset_path`` from the store's
    harvest manifest (None when the cache is not there to read)."""
    if not manifest:
        return {"context_size": None, "prepend_bos": True, "dataset_path": None}
    tokens, text = manifest.get("tokenization", {}), manifest.get("text", {})
    dataset = text.get("dataset") if text.get("source") == "hf_dataset" else None
    if dataset is None:
        dataset = (
            f"{text.get('source')}: {', '.join(text.get('languages') or text.get('paths') or [])}"
        )
    return {
        "context_size": tokens.get("context_length"),
        "prepend_bos": tokens.get("prepend_bos", True),
        "dataset_path": dataset,
    }


def _world_readable(*paths: Path) -> None:
    """safetensors writes 0600; an export is meant to be shared: 0644 like the JSON beside it."""
    for path in paths:
        path.chmod(0o644)


def export_saelens(
    coder: Any, record: RunRecord, out: Path, harvest: dict[str, Any] | None = None
) -> list[Path]:
    """One SAELens folder per layer of a per-layer SAE; returns the folders. ``harvest``:
    the store's harvest manifest, for the context size and dataset."""
    if coder.config.kind != "per_layer_sae":
        raise ExportError(
            f"--format saelens takes per-layer SAE runs; this run is a {coder.config.kind} "
            "(use --format dictionary_learning)"
        )
    n_layers, m = coder.n_layers, coder.config.latents_per_layer
    threshold = _activation_threshold(coder)
    kind = _inference_kind(coder)
    folders = []
    for layer, hook in enumerate(record.hook_names):
        one = slice(layer, layer + 1)
        layer_record = replace(record, mean=record.mean[one], scale=record.scale[one])
        folded = fold(
            coder.W_enc.detach()[one],
            coder.b_enc.detach().view(n_layers, m)[layer],
            coder.W_dec.detach()[one],
            coder.b_dec.detach()[one],
            layer_record,
        )
        tensors = {
            "W_enc": folded.W_enc[0].contiguous(),  # [d, m]
            "W_dec": folded.W_dec[0].contiguous(),  # [m, d]
            "b_enc": folded.b_enc.contiguous(),
            "b_dec": folded.b_dec[0].contiguous(),
        }
        cfg: dict[str, Any] = {
            "d_in": coder.d_model,
            "d_sae": m,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": False,  # raw-unit biases: the fold needs no input shift
            "normalize_activations": "none",  # folded into the weights
            "reshape_activations": "none",
        }
        if kind == "relu":
            cfg["architecture"] = "standard"
        elif kind == "topk":
            cfg.update(architecture="topk", k=coder.config.k, rescale_acts_by_decoder_norm=False)
        else:
            cfg["architecture"] = "jumprelu"
            tensors["threshold"] = threshold.view(n_layers, m)[layer].contiguous()
        cfg["metadata"] = {
            "sae_lens_version": SAELENS_VERSION,
            "sae_lens_training_version": None,
            "hook_name": hook,
            "model_class_name": "HookedTransformer",
            **model_identity(record.model),
            **harvest_context(harvest),
            "fmxcoders": {
                "run": record.name,
                "cache_key": record.cache_key,
                "layer": record.layers[layer],
                "activation": coder.config.activation,
                "model": record.model,
                "storage_dtype": record.storage_dtype,
            },
        }
        folder = Path(out) / _safe_folder(hook)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "sae_weights.safetensors"))
        (folder / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        _world_readable(folder / "sae_weights.safetensors", folder / "cfg.json")
        folders.append(folder)
    return folders


@torch.no_grad()
def topk_threshold(coder: Any, record: RunRecord, batches: Iterable[Tensor]) -> dict[str, Any]:
    """The code threshold at which a TopK coder fires k latents per token on average over
    ``batches`` (raw training activations ``[n, L, d]``): the (k * N)-th largest positive code
    of all N tokens, i.e. BatchTopK's selection on one batch of every token (what
    dictionary_learning's BatchTopK trainer tracks as an EMA of each batch's smallest kept
    code). Returns the threshold, N and the mean L0 that threshold gives on those tokens."""
    k = int(coder.config.k)
    kept, tokens = torch.empty(0), 0
    for x in batches:
        codes = coder.encode_pre(record.normalise(x)).relu().flatten()
        tokens += x.shape[0]
        pool = torch.cat([kept, codes[codes > 0]])
        kept = pool.topk(min(k * tokens, pool.numel()), sorted=False).values
    if tokens == 0:
        raise ExportError("no training activations to estimate the TopK threshold on")
    # fewer positive codes than k * N: every positive code fires, as in BatchTopK
    threshold = float(kept.min()) if kept.numel() == k * tokens else 0.0
    return {
        "threshold": threshold,
        "tokens": tokens,
        "mean_l0": float((kept > threshold).sum()) / tokens,
        "k": k,
    }


def training_batches(
    store: Any, record: RunRecord, tokens: int = CALIBRATION_TOKENS, batch: int = 2048
) -> Iterator[Tensor]:
    """Raw activations of at most ``tokens`` training-split tokens of ``store`` (an
    ActivationStore) at the record's hooks, in ``batch``-row blocks spread evenly over the
    split (contiguous rows: each block is one read)."""
    from pipeline.training.loader import split_rows

    rows = split_rows(store, "train")
    blocks = [rows[i : i + batch] for i in range(0, rows.size, batch)]
    wanted = min(len(blocks), math.ceil(tokens / batch))
    picks = sorted({round(i * (len(blocks) - 1) / max(wanted - 1, 1)) for i in range(wanted)})
    for block in (blocks[i] for i in picks):
        x = store.read(int(block[0]), int(block[-1]) + 1, hooks=record.hook_names)
        yield x[torch.from_numpy(block - block[0])]


def export_dictionary_learning(
    coder: Any, record: RunRecord, out: Path, calibration: Iterable[Tensor] | None = None
) -> Path:
    """A crosscoder/fmxcoder (dense expansion) in dictionary_learning's CrossCoder layout.

    ``calibration``: raw training activations ``[n, L, d]`` (batches) on which a TopK
    coder's threshold is estimated (``topk_threshold``); required for TopK coders only."""
    if coder.config.kind == "per_layer_sae":
        raise ExportError(
            "--format dictionary_learning takes crosscoder and fmxcoder runs; a per-layer SAE "
            "run exports with --format saelens"
        )
    kind = _inference_kind(coder)
    if coder.config.activation == "jumprelu":
        raise ExportError(
            "dictionary_learning's crosscoders have no per-latent JumpReLU threshold: "
            "a jumprelu crosscoder cannot be exported to it"
        )
    folded = fold(
        coder.encoder_weight().detach(),
        coder.b_enc.detach(),
        coder.decoder_weight().detach().transpose(0, 1),
        coder.b_dec.detach(),
        record,
    )
    n_layers, d, m = folded.W_enc.shape
    nan = torch.full((n_layers, d), float("nan"))
    norm_name = "CROSSCODER" if kind == "relu" else "NONE"
    tensors = {
        "encoder.weight": folded.W_enc.contiguous(),
        "encoder.bias": folded.b_enc.contiguous(),
        "decoder.weight": folded.W_dec.contiguous(),
        "decoder.bias": folded.b_dec.contiguous(),
        "activation_mean": nan.clone(),  # NaN: the class's own normaliser is off (folded)
        "activation_std": nan.clone(),
        "target_rms": torch.tensor(1.0),
        "activation_global_scale": torch.tensor(1.0),
        "code_normalization_id": torch.tensor(_CODE_NORMALISATION_ID[norm_name]),
    }
    config: dict[str, Any] = {
        "activation_dim": d,
        "dict_size": m,
        "num_layers": n_layers,
        "code_normalization": norm_name,
        "target_rms": 1.0,
    }
    class_name, estimate = "CrossCoder", None
    if kind != "relu":
        class_name = "BatchTopKCrossCoder"
        tracked = _activation_threshold(coder)  # one activation group: a scalar
        if tracked is not None:
            value = float(tracked[0])
        elif calibration is None:
            raise ExportError(
                "a TopK crosscoder's dictionary_learning export needs the run's training "
                "activations (its cache) to set the threshold at which the library's "
                "forward fires k latents per token"
            )
        else:
            estimate = topk_threshold(coder, record, calibration)
            value = estimate["threshold"]
        tensors["k"] = torch.tensor(coder.config.k, dtype=torch.int32)
        tensors["threshold"] = torch.tensor(value, dtype=torch.float32)
        config["k"] = coder.config.k
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    provenance = {
        "class": class_name,
        "layout": "jkminder/dictionary_learning CrossCoder (encoder [L,d,m], decoder [L,m,d])",
        "activation": coder.config.activation,
        "per_token_topk": kind == "topk",
        "usage": "forward(x) on raw activations [batch, L, d]"
        + (
            " (a threshold set at L0 = k on training tokens); exact per-token TopK: "
            "decode(encode(x_token, use_threshold=False)) one token at a time"
            if kind == "topk"
            else ""
        ),
        **({"threshold_estimate": estimate} if estimate else {}),
        "hook_names": record.hook_names,
        **record.metadata(),
        "coder": coder.config.model_dump(mode="json"),
    }
    (out / "fmxcoders.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    _world_readable(*(out / n for n in ("model.safetensors", "config.json", "fmxcoders.json")))
    return out


def export_run(
    checkpoint: Path,
    fmt: str,
    out: Path,
    cache_root: Path | None = None,
    calibration: Tensor | None = None,
) -> list[Path]:
    """Export a run's final checkpoint (or any checkpoint directory); returns what it wrote.

    A TopK crosscoder's threshold is estimated on ``calibration`` (raw ``[n, L, d]``) if
    given, else on the run's store's training split (which must then be on this machine)."""
    from pipeline.training.checkpoint import load_coder
    from pipeline.training.run_record import load_record

    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    coder = load_coder(checkpoint)
    record = load_record(checkpoint, cache_root)
    if fmt == "saelens":
        store = _run_store(record, cache_root)
        return export_saelens(coder, record, out, store.manifest.get("manifest") if store else None)
    if calibration is not None or coder.config.kind == "per_layer_sae":
        batches = None if calibration is None else [calibration]
        return [export_dictionary_learning(coder, record, out, batches)]
    if _inference_kind(coder) != "topk":
        return [export_dictionary_learning(coder, record, out)]
    store = _run_store(record, cache_root)
    if store is None:
        raise ExportError(
            f"a TopK crosscoder's dictionary_learning export sets its threshold on the run's "
            f"training activations: cache {record.cache_key} is not on this machine "
            "(--cache-root names where it is)"
        )
    return [export_dictionary_learning(coder, record, out, training_batches(store, record))]


def _run_store(record: RunRecord, cache_root: Path | None) -> Any:
    """The run's store (an ActivationStore, opened through its checks), or None when the
    cache is not on this machine (most exports need only the run)."""
    from pipeline.store.catalog import find_store
    from pipeline.store.reader import StoreError

    try:
        return find_store(record.cache_key, cache_root)
    except StoreError:
        return None


# ---------------------------------------------------------- the libraries' forwards, re-read


def saelens_forward(folder: Path, x: Tensor) -> Tensor:
    """SAELens 6.x inference (standard / topk / jumprelu) from ``folder``'s files, on raw x."""
    cfg = json.loads((Path(folder) / "cfg.json").read_text(encoding="utf-8"))
    w = load_file(str(Path(folder) / "sae_weights.safetensors"))
    sae_in = x - w["b_dec"] * float(cfg.get("apply_b_dec_to_input", True))
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    arch = cfg["architecture"]
    if arch == "standard":
        acts = pre.relu()
    elif arch == "topk":
        vals, idx = pre.topk(cfg["k"], dim=-1, sorted=False)
        acts = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    elif arch == "jumprelu":
        acts = pre.relu() * (pre > w["threshold"]).to(pre.dtype)
    else:
        raise ExportError(f"{folder}: architecture {arch!r} is not one this module writes")
    return acts @ w["W_dec"] + w["b_dec"]


def dictionary_learning_codes(folder: Path, x: Tensor, per_token_topk: bool = False) -> Tensor:
    """dictionary_learning's CrossCoder / BatchTopKCrossCoder codes ``[B, m]`` of raw
    ``[B, L, d]``, as its classes compute them (code normalisation NONE).

    Default: ``cc(x)``'s ``encode`` (``f * (f > threshold)``; an unset threshold, -1, keeps
    every positive code, as the library does). ``per_token_topk``: ``encode(x_token,
    use_threshold=False)`` one token at a time, i.e. BatchTopK over a batch of one token."""
    w = load_file(str(Path(folder) / "model.safetensors"))
    f = (torch.einsum("bld,ldf->bf", x, w["encoder.weight"]) + w["encoder.bias"]).relu()
    if "k" not in w:
        return f
    if not per_token_topk:
        return f * (f > w["threshold"])
    vals, idx = f.topk(int(w["k"]), dim=-1, sorted=False)
    return torch.zeros_like(f).scatter(-1, idx, vals)


def dictionary_learning_forward(folder: Path, x: Tensor, per_token_topk: bool = False) -> Tensor:
    """dictionary_learning's reconstruction of raw ``[B, L, d]`` (see
    ``dictionary_learning_codes`` for the two calls)."""
    w = load_file(str(Path(folder) / "model.safetensors"))
    f = dictionary_learning_codes(folder, x, per_token_topk)
    return torch.einsum("bf,lfd->bld", f, w["decoder.weight"]) + w["decoder.bias"]
