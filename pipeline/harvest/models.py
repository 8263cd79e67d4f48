"""Load a transformer_lens model and capture several hook points in one stopped-early forward.

Every source ends in the same place: a Hugging Face model + tokenizer wrapped by
``TransformerBridge.boot_transformers``. A GGUF file is dequantised once (~15 s for
SmolLM2) and saved as a plain HF directory under ``models_dir()``, so later loads are fast.
"""

from __future__ import annotations

import contextlib
import difflib
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.harvest.assets import GEMMA3_270M, SMOLLM2, asset_identity, packaged_gguf, sha256_file
from pipeline.manifests.harvest import HookSpec, ModelSpec
from pipeline.paths import models_dir
from pipeline.store.locks import exclusive_lock

# Each a GGUF shipped on PyPI; two families (Llama, Gemma 3) so findings are not one model's.
PACKAGED_MODELS = {"smollm2-135m": SMOLLM2, "gemma3-270m": GEMMA3_270M}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """A model that cannot be found or loaded; the message names the manifest field."""


class _StopForward(Exception):
    """Raised by the last hook we need: nothing after it is computed."""


@dataclass
class ActivationModel:
    """A booted model plus what harvesting needs to know about it."""

    bridge: torch.nn.Module
    tokenizer: object
    n_layers: int
    d_model: int

    @property
    def device(self) -> torch.device:
        return next(self.bridge.parameters()).device

    def hook_names(self, hooks: HookSpec) -> list[str]:
        layers = range(self.n_layers) if hooks.layers == "all" else hooks.layers
        for layer in layers:
            if layer >= self.n_layers:
                raise ModelError(
                    f"hooks.layers: layer {layer} does not exist (the model has {self.n_layers})"
                )
        names = [f"blocks.{layer}.{hooks.suffix}" for layer in layers]
        self.check_hooks(names, hooks.point)
        return names

    def check_hooks(self, names: list[str], point: str) -> None:
        """Every name is a hook of this model giving ``[batch, pos, d_model]``; otherwise a
        one-line error naming ``hooks.point`` and the closest hook names."""
        known = getattr(self.bridge, "hook_dict", None)
        if known is None:
            return
        missing = [name for name in names if name not in known]
        if missing:
            block, _, wanted = missing[0].partition(".")[2].partition(".")
            inside = sorted(k.split(".", 2)[2] for k in known if k.startswith(f"blocks.{block}."))
            close = difflib.get_close_matches(wanted, inside, n=4, cutoff=0.4)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise ModelError(
                f"hooks.point: this model has no hook {missing[0]} ({len(known)} hooks){hint}"
            )
        shapes: dict[str, tuple[int, ...]] = {}

        def record(activation: torch.Tensor, hook: object) -> torch.Tensor:
            shapes[getattr(hook, "name", "")] = tuple(activation.shape)
            return activation

        probe = torch.zeros((1, 2), dtype=torch.long, device=self.device)
        with torch.inference_mode(), contextlib.suppress(_StopForward):
            self.bridge.run_with_hooks(probe, fwd_hooks=[(names[0], record)])
        shape = next(iter(shapes.values()), None)
        if shape is not None and shape != (1, 2, self.d_model):
            raise ModelError(
                f"hooks.point: {names[0]} gives activations of shape {list(shape)}, but a store "
                f"holds [batch, pos, d_model={self.d_model}] (e.g. resid_post, attn_out, mlp_out)"
            )

    @torch.inference_mode()
    def capture(self, tokens: torch.Tensor, hook_names: list[str], out: torch.Tensor) -> None:
        """Run ``tokens [batch, ctx]`` and write hook ``j`` into ``out[:, :, j]``.

        ``out`` is ``[batch, ctx, n_hooks, d_model]`` in the storage dtype; the forward stops
        after the last hook (no later blocks, no unembedding).
        """

        def writer(index: int, last: bool):
            def hook(activation: torch.Tensor, hook: object) -> torch.Tensor:
                out[:, :, index].copy_(activation, non_blocking=True)
                if last:
                    raise _StopForward
                return activation

            return hook

        fwd_hooks = [
            (name, writer(j, j == len(hook_names) - 1)) for j, name in enumerate(hook_names)
        ]
        with contextlib.suppress(_StopForward):
            self.bridge.run_with_hooks(tokens.to(self.device), fwd_hooks=fwd_hooks)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_identity(spec: ModelSpec) -> dict:
    """What identifies the weights and tokenizer for the cache key (hashes, not paths)."""
    if spec.source == "packaged":
        return asset_identity(_packaged_asset(spec))
    if spec.source == "gguf":
        return {"gguf_sha256": sha256_file(_gguf_path(spec))}
    if spec.source == "hub":
        return {"hub": spec.name, "revision": spec.revision}
    return {"random": True, "n_layers": spec.n_layers, "d_model": spec.d_model, "seed": spec.seed}


def _packaged_asset(spec: ModelSpec):
    if spec.name not in PACKAGED_MODELS:
        known = ", ".join(sorted(PACKAGED_MODELS))
        raise ModelError(f"model.name: no packaged model '{spec.name}' (known: {known})")
    return PACKAGED_MODELS[spec.name]


def _gguf_path(spec: ModelSpec) -> Path:
    path = Path(spec.path or "")
    if not path.is_file():
        raise ModelError(f"model.path: GGUF file '{path}' does not exist")
    return path


def _dequantised_dir(gguf: Path, digest: str) -> Path:
    """Dequantise a GGUF into a plain HF directory once; reuse it afterwards."""
    target = models_dir() / f"gguf-{digest[:16]}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(Path(str(target) + ".lock")):
        if not (target / "config.json").is_file():
            staging = target.with_name(target.name + ".tmp")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            quantised = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
            # A GGUF-loaded model refuses save_pretrained; copy it into a plain one.
            config = quantised.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(quantised.state_dict(), strict=True)
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            staging.replace(target)
    return target


def _random_model_dir(spec: ModelSpec) -> Path:
    """A tiny randomly initialised Llama with a byte-level tokenizer, for fast tests."""
    from pipeline.harvest.tiny_model import build_tiny_model

    target = models_dir() / f"random-{spec.n_layers}x{spec.d_model}-seed{spec.seed}"
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(Path(str(target) + ".lock")):
            if not (target / "config.json").is_file():
                build_tiny_model(target, spec.n_layers, spec.d_model, spec.seed)
    return target


def _local_dir(spec: ModelSpec) -> Path | None:
    if spec.source == "packaged":
        asset = _packaged_asset(spec)
        return _dequantised_dir(packaged_gguf(asset), asset_identity(asset)["sha256"])
    if spec.source == "gguf":
        path = _gguf_path(spec)
        return _dequantised_dir(path, sha256_file(path))
    if spec.source == "random":
        return _random_model_dir(spec)
    return None


def load_model(spec: ModelSpec, device: str = "auto") -> ActivationModel:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = TORCH_DTYPES[spec.dtype]
    target = resolve_device(device)
    local = _local_dir(spec)
    if local is None:  # hub: real code, needs network access to the hub
        bridge = TransformerBridge.boot_transformers(
            spec.name, revision=spec.revision, dtype=dtype, device=target
        )
        tokenizer = bridge.tokenizer
    else:
        tokenizer = AutoTokenizer.from_pretrained(local)
        hf_model = AutoModelForCausalLM.from_pretrained(local, dtype=dtype).to(target).eval()
        bridge = TransformerBridge.boot_transformers(
            str(local), hf_model=hf_model, tokenizer=tokenizer, dtype=dtype, device=target
        )
    bridge.eval()
    return ActivationModel(bridge, tokenizer, int(bridge.cfg.n_layers), int(bridge.cfg.d_model))
