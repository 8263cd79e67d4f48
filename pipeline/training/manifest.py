"""The coder manifest: which cache, which coder, how to train it.

``cache``, ``layers``, ``coder`` and ``training`` decide the weights and key the run
directory; ``run`` (device, paths, progress) does not.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.harvest.cache_key import canonical_json
from pipeline.manifests.harvest import Strict
from pipeline.manifests.io import (
    ManifestError,
    check_name,
    describe_validation_error,
    load_manifest,
)
from pipeline.store.outliers import DEFAULT_RATIO


class CacheRef(Strict):
    harvest_manifest: str | None = Field(
        None, description="Path of the harvest manifest (relative to this file); its key is used."
    )
    key: str | None = Field(None, description="Or the cache key itself (see `pipeline ls`).")
    root: str | None = Field(None, description="Store root; default $FMX_CACHE_DIR.")

    @model_validator(mode="after")
    def _one_of(self) -> CacheRef:
        if (self.harvest_manifest is None) == (self.key is None):
            raise ValueError("cache needs exactly one of cache.harvest_manifest or cache.key")
        return self


class TrainingSpec(Strict):
    tokens: int = Field(
        200_000,
        ge=0,
        description="Token budget (training steps x batch); 0 saves the initialised coder "
        "(an untrained control).",
    )
    batch_size: int = Field(1024, ge=1, description="Tokens per step.")
    lr: float = Field(3e-4, gt=0, description="Adam learning rate.")
    beta1: float = Field(0.9, ge=0, lt=1, description="Adam beta1.")
    beta2: float = Field(0.999, ge=0, lt=1, description="Adam beta2.")
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="Linear LR warmup share.")
    decay: Literal["constant", "linear", "cosine"] = Field(
        "linear", description="LR schedule after warmup (to 0 at the end)."
    )
    decay_fraction: float = Field(0.2, ge=0, le=1, description="Final share that decays.")
    grad_clip: float = Field(1.0, ge=0, description="Max gradient norm (0 disables).")
    seed: int = Field(0, description="Batch order seed (the coder has its own init seed).")
    centre: bool = Field(True, description="Subtract each layer's mean before scaling.")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, float32 on CPU."
    )
    checkpoint_every: int = Field(200, ge=1, description="Steps between checkpoints.")
    log_every: int = Field(20, ge=1, description="Steps between metric log lines.")
    validation_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Share of the store's train documents held out as the validation split "
        "(by a hash of doc_id); training never sees them. The test split is never used.",
    )
    eval_every: int = Field(
        200,
        ge=1,
        description="Steps between held-out checks (val_fvu, val_l0 on validation rows; "
        "also at the final step).",
    )
    outlier_norm_ratio: float | None = Field(
        DEFAULT_RATIO,
        gt=1,
        description="Drop tokens whose norm at any stored layer exceeds this multiple of the "
        "layer's median (massive activations) from training, validation, evaluation and the "
        "normalisation; null keeps every token.",
    )
    validation_tokens: int = Field(
        4096, ge=1, description="Validation rows decoded once for the held-out checks."
    )


class WandbSpec(Strict):
    """Optional Weights & Biases logging (needs ``pip install wandb``; off by default)."""

    project: str = Field(description="W&B project the run logs to.")
    entity: str | None = Field(None, description="W&B entity (team or user); default: yours.")
    mode: Literal["online", "offline", "disabled"] = Field(
        "online", description="offline: write locally, `wandb sync` later."
    )


class TrainRunSpec(Strict):
    """How to run; never part of the run key."""

    device: str = Field("auto", description="'auto', 'cpu', 'cuda', ...")
    runs_root: str | None = Field(None, description="Runs root; default $FMX_RUNS_DIR.")
    loader_mode: Literal["auto", "resident", "memmap", "stream"] = Field(
        "auto",
        description="Keep the split on the device, serve it from a decoded file beside the "
        "caches, or stream chunks; auto picks by the device, RAM and disk budgets.",
    )
    resident_max_bytes: int | None = Field(
        None,
        ge=0,
        description="Cap for auto's resident mode; default half the device's free memory.",
    )
    decode: Literal["cpu", "gpu"] = Field(
        "cpu",
        description="Where chunks are decompressed: cpu (zarr), or gpu (nvCOMP on a CUDA "
        "device; the store must be harvested with storage: {codec: zstd-gpu}).",
    )
    stream_strata: int | None = Field(
        None,
        ge=1,
        description="Stream mode: every batch takes a fixed share from each of this many "
        "segments of its window, so each torchrun rank decodes only its own segments; the "
        "batches depend on it, not on the rank count. Default: the number of ranks.",
    )
    progress: bool = Field(True, description="Show a progress bar.")
    wandb: WandbSpec | None = Field(
        None, description="Log metrics to Weights & Biases as well (default: off)."
    )


class CoderManifest(Strict):
    name: str = Field(description="A short label for tables and plots.")
    cache: CacheRef
    layers: Literal["all"] | tuple[int, ...] = Field(
        "all", description="Which of the store's hooks (indices into its hook list)."
    )
    coder: dict[str, Any] = Field(
        description="Coder config (kind, n_latents, activation, ...); n_layers and d_model "
        "are filled in from the store."
    )
    training: TrainingSpec = TrainingSpec()
    run: TrainRunSpec = TrainRunSpec()

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        return check_name(name)

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, layers: Literal["all"] | tuple[int, ...]):
        if layers != "all":
            if not layers:
                raise ValueError("must name at least one hook")
            if min(layers) < 0 or sorted(set(layers)) != list(layers):
                raise ValueError(f"must be distinct, ascending, non-negative, not {list(layers)}")
        return layers

    def run_hash(self) -> str:
        """Hash of what decides the weights (not the name, not ``run``)."""
        material = self.model_dump(mode="json", include={"layers", "coder", "training"})
        return hashlib.sha256(canonical_json(material).encode()).hexdigest()[:12]

    def total_steps(self) -> int:
        return -(-self.training.tokens // self.training.batch_size)


def recorded_manifest(data: dict[str, Any]) -> CoderManifest:
    """A run's recorded manifest. Runs recorded before outlier exclusion existed kept every
    token, so a record without the field reads as null, not as today's default."""
    training = data.get("training", {})
    if "outlier_norm_ratio" not in training:
        data = {**data, "training": {**training, "outlier_norm_ratio": None}}
    return CoderManifest.model_validate(data)


def load_coder_manifest(path: str | Path) -> tuple[CoderManifest, Path]:
    """The manifest and the directory its relative paths are resolved against."""
    path = Path(path)
    manifest = load_manifest(CoderManifest, path)
    return manifest, path.parent


def check_coder_section(manifest: CoderManifest, n_layers: int, d_model: int, source: str):
    """Validate the coder section against the store's shape; errors name the manifest."""
    from pydantic import ValidationError

    from pipeline.coders import coder_config_from_dict

    data = {**manifest.coder, "n_layers": n_layers, "d_model": d_model}
    try:
        return coder_config_from_dict(data)
    except ValidationError as err:
        message = describe_validation_error(err, source).replace("field '", "field 'coder.")
        raise ManifestError(message) from None
