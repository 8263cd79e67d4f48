"""The experiment manifest: one harvest, many coder variants, one evaluation.

Each variant is a coder manifest written as overrides of the shared ``defaults``
(deep-merged), so a sweep or an ablation is a few lines, and every variant trains from
the same cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from pipeline.harvest_manifest import Strict
from pipeline.manifest_io import ManifestError, load_manifest, validate
from pipeline.train_manifest import CoderManifest


class EvaluationSpec(Strict):
    judge: str = Field("purity", description="purity (offline) | openai | transformers.")
    latents_sampled: int = Field(24, ge=0, description="Latents judged and given report pages.")
    max_tokens: int | None = Field(None, ge=1, description="Cap on held-out tokens evaluated.")
    splice: bool = Field(False, description="Spliced-in CE/KL score (runs the model).")


class LrSweepSpec(Strict):
    lrs: list[float] = Field(min_length=1, description="Learning rates tried per variant.")
    tokens: int = Field(ge=1, description="Token budget of each sweep run (seed 0).")


class SparsitySweepSpec(Strict):
    k: list[int] = Field(
        default_factory=list,
        description="k values tried for every variant with a top-k activation (seed 0).",
    )
    per_variant: dict[str, list[int]] = Field(
        default_factory=dict, description="Per-variant k lists (variant name: [k, ...])."
    )

    def ks(self, variant: str) -> list[int]:
        return self.per_variant.get(variant, self.k)


class ExperimentManifest(Strict):
    name: str = Field(description="Experiment name; results go to results/<name>/.")
    harvest: str = Field(description="Harvest manifest path, relative to this file.")
    defaults: dict[str, Any] = Field(
        default_factory=dict, description="Coder-manifest fields shared by every variant."
    )
    variants: list[dict[str, Any]] = Field(description="Per-variant overrides (name required).")
    evaluation: EvaluationSpec = EvaluationSpec()
    seeds: list[int] = Field(
        default_factory=lambda: [0],
        min_length=1,
        description="Every variant is trained once per seed (coder init and batch order).",
    )
    controls: bool = Field(
        True, description="Evaluate an untrained (random-init) run of each variant per seed."
    )
    lr_sweep: LrSweepSpec | None = Field(
        None, description="Per-variant learning rate, chosen by validation FVU on seed 0."
    )
    sparsity_sweep: SparsitySweepSpec | None = Field(
        None, description="Extra seed-0 runs per k: an L0-FVU frontier per variant."
    )
    results_dir: str | None = Field(None, description="Default: results/<name> beside the repo.")

    @model_validator(mode="after")
    def _distinct_names(self) -> ExperimentManifest:
        names = [v.get("name") for v in self.variants]
        if None in names:
            raise ValueError("every entry of variants needs a name")
        if len(set(names)) != len(names):
            raise ValueError(f"variants: names must be distinct, got {names}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: must be distinct, got {self.seeds}")
        unknown = set(self.sparsity_sweep.per_variant) - set(names) if self.sparsity_sweep else ()
        if unknown:
            raise ValueError(f"sparsity_sweep.per_variant: no variant named {sorted(unknown)}")
        return self


def deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def variant_manifests(
    experiment: ExperimentManifest, base: Path, source: str
) -> list[tuple[CoderManifest, Path]]:
    """Every variant as a validated coder manifest naming the experiment's harvest."""
    out = []
    for index, variant in enumerate(experiment.variants):
        data = deep_merge(experiment.defaults, variant)
        data["cache"] = {"harvest_manifest": experiment.harvest}
        label = f"{source} (variants[{index}] '{variant['name']}')"
        out.append((validate(CoderManifest, data, label), base))
    return out


def load_experiment(path: str | Path) -> tuple[ExperimentManifest, Path]:
    path = Path(path)
    experiment = load_manifest(ExperimentManifest, path)
    if not (path.parent / experiment.harvest).is_file():
        raise ManifestError(f"{path}: field 'harvest': no file {path.parent / experiment.harvest}")
    return experiment, path.parent
