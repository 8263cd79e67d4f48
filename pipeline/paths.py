"""Every artifact path in the project is built here, and only here.

Layout::

    $FMX_DATA_DIR/                      (default ~/.cache/fmxcoders)
      assets/<package>-<version>/       offline model/text packages, unpacked and verified
      models/<model-id>/                dequantised weights + tokenizer (fast reloads)
      cache/<key>/                      a finished activation store (StorePaths)
      cache/<key>.incomplete/           a store being harvested (resumable)
      cache/<key>.lock                  held while harvesting
      decoded/<key>-<digest>.bin        one split of a store, uncompressed (loader memmap
                                        mode; a cache: delete the .bin and .json to remove)
      runs/<key>/<coder-hash>/          a training run (RunPaths)
      runs/<key>/<coder-hash>/evaluation/   that run's latest evaluation (EvaluationPaths)
      reports/<key>-<digest>/           a side-by-side evaluation report (ReportPaths)
      spectrum/<key>-<layers>-<c|u>.json  cached decoder floor FVUs (evaluation/spectrum.py)
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path


def data_dir() -> Path:
    return Path(os.environ.get("FMX_DATA_DIR", Path.home() / ".cache" / "fmxcoders"))


def assets_dir() -> Path:
    return data_dir() / "assets"


def models_dir() -> Path:
    return data_dir() / "models"


def default_cache_root() -> Path:
    return Path(os.environ.get("FMX_CACHE_DIR", data_dir() / "cache"))


def default_runs_root() -> Path:
    return Path(os.environ.get("FMX_RUNS_DIR", data_dir() / "runs"))


def default_reports_root() -> Path:
    return Path(os.environ.get("FMX_REPORTS_DIR", data_dir() / "reports"))


def spectrum_cache_file(
    key: str, layers: list[int], centre: bool, outlier_ratio: float | None = None
) -> Path:
    """Cached floor FVUs of one store, layer selection, centring and outlier rule (outside
    the store)."""
    tag = "-".join(map(str, layers))
    if len(tag) > 40:
        tag = hashlib.sha256(tag.encode()).hexdigest()[:16]
    rule = "" if outlier_ratio is None else f"-x{outlier_ratio:g}"
    return data_dir() / "spectrum" / f"{key}-{tag}-{'c' if centre else 'u'}{rule}.json"


def outlier_scan_file(key: str, ratio: float) -> Path:
    """Cached massive-activation scan of one store at one norm ratio (outside the store)."""
    return data_dir() / "outliers" / f"{key}-{ratio:g}.safetensors"


def decoded_split_file(store_key: str, digest: str) -> Path:
    """The loader's uncompressed copy of one split of a store (its record: ``.json``
    beside it). Outside the store directory, so the store stays read-only and verifiable."""
    root = Path(os.environ.get("FMX_DECODED_DIR", data_dir() / "decoded"))
    return root / f"{store_key}-{digest}.bin"


def store_dir(cache_root: Path, key: str) -> Path:
    return cache_root / key


def incomplete_store_dir(cache_root: Path, key: str) -> Path:
    return cache_root / f"{key}.incomplete"


def store_lock(cache_root: Path, key: str) -> Path:
    return cache_root / f"{key}.lock"


@dataclass(frozen=True)
class StorePaths:
    """Files inside one activation store directory."""

    root: Path

    @property
    def activations(self) -> Path:
        return self.root / "activations.zarr"

    def array(self, hook_name: str) -> Path:
        return self.activations / hook_name

    @property
    def tokens(self) -> Path:
        return self.root / "tokens.parquet"

    @property
    def documents(self) -> Path:
        return self.root / "documents.parquet"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def stats(self) -> Path:
        return self.root / "stats.safetensors"

    @property
    def blocks(self) -> Path:
        return self.root / "blocks"

    def block_marker(self, block: int) -> Path:
        return self.blocks / f"{block:06d}.safetensors"

    @property
    def completion(self) -> Path:
        return self.root / "complete.json"


@dataclass(frozen=True)
class RunPaths:
    """Files inside one training run directory."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "coder_manifest.json"

    def checkpoint(self, step: int) -> Path:
        return self.root / f"checkpoint-{step:09d}"

    def checkpoints(self) -> list[Path]:
        """Checkpoint directories, newest first."""
        return sorted(self.root.glob("checkpoint-*"), reverse=True)

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def lock(self) -> Path:
        """Held by the one ``pipeline train`` that trains this run (removed on exit)."""
        return self.root / "train.lock"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def loader(self) -> Path:
        """The loader mode this run's latest session used, and why (stages/train.py)."""
        return self.root / "loader.json"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"


def run_dir(runs_root: Path, cache_key: str, coder_hash: str) -> Path:
    return runs_root / cache_key / coder_hash


@dataclass(frozen=True)
class EvaluationPaths:
    """One variant's evaluation results (inside its run directory)."""

    root: Path

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def per_layer(self) -> Path:
        return self.root / "per_layer.parquet"

    @property
    def latents(self) -> Path:
        return self.root / "latents.parquet"

    @property
    def probing(self) -> Path:
        return self.root / "probing.parquet"


@dataclass(frozen=True)
class ReportPaths:
    """A side-by-side evaluation of several variants: tables, plots, HTML."""

    root: Path

    @property
    def summary(self) -> Path:
        return self.root / "results.json"

    def table(self, name: str) -> Path:
        """Combined long tables: variants, per_layer, probing, latents, sampled."""
        return self.root / f"{name}.parquet"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def plot(self, name: str) -> Path:
        return self.plots / f"{name}.png"

    @property
    def index(self) -> Path:
        return self.root / "index.html"

    def latent_page(self, variant_slug: str, latent: int) -> Path:
        return self.root / "latents" / variant_slug / f"{latent}.html"


def report_dir(reports_root: Path, cache_key: str, digest: str) -> Path:
    return reports_root / f"{cache_key}-{digest}"


@dataclass(frozen=True)
class ExperimentPaths:
    """What ``pipeline run`` writes for one experiment (committed under results/)."""

    root: Path

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def table_json(self) -> Path:
        return self.root / "table.json"

    @property
    def table_markdown(self) -> Path:
        return self.root / "table.md"

    @property
    def protocol_labels(self) -> Path:
        """Each evaluated run's protocol label (variant, role, seed, lr), by run directory."""
        return self.root / "protocol.json"

    @property
    def experiment_manifest(self) -> Path:
        return self.root / "experiment.yaml"

    @property
    def harvest_manifest(self) -> Path:
        return self.root / "harvest.yaml"
