"""The experiment manifest: one harvest, many coder variants, one evaluation.

Each variant is a coder manifest written as overrides of the shared ``defaults``
(deep-merged), so a sweep or an ablation is a few lines, and every variant trains from
the same cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.manifests.harvest import HarvestManifest, Strict, load_harvest_manifest
from pipeline.manifests.io import ManifestError, check_name, load_manifest, validate
from pipeline.training.manifest import CoderManifest, check_coder_section

# Known shapes (n_layers, d_model), so coder sections are checked before any harvest.
PACKAGED_SHAPES = {"smollm2-135m": (30, 576)}


class EvaluationSpec(Strict):
    judge: Literal["purity", "openai", "transformers"] = Field(
        "purity", description="purity (offline) | openai | transformers."
    )
    latents_sampled: int = Field(24, ge=0, description="Latents judged and given report pages.")
    max_tokens: int | None = Field(None, ge=1, description="Cap on held-out tokens evaluated.")
    splice: bool = Field(False, description="Spliced-in CE/KL score (runs the model).")


class LrSweepSpec(Strict):
    lrs: list[float] = Field(min_length=1, description="Learning rates tried per variant.")
    tokens: int = Field(ge=1, description="Token budget of each sweep run (seed 0).")
    extend_at_edges: int = Field(
        2,
        ge=0,
        description="When a variant's best lr is the lowest or highest tried, try up to this "
        "many more beyond it, one at a time, each a step of the grid's own ratio further.",
    )


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

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        return check_name(name)

    @model_validator(mode="after")
    def _distinct_names(self) -> ExperimentManifest:
        names = [v.get("name") for v in self.variants]
        if None in names:
            raise ValueError("every entry of variants needs a name")
        for index, name in enumerate(names):
            if not isinstance(name, str):
                raise ValueError(f"variants[{index}].name must be text, not {name!r}")
            try:
                check_name(name)
            except ValueError as err:
                raise ValueError(f"variants[{index}].name {err}") from None
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


def _store_shape(harvest: HarvestManifest) -> tuple[int | None, int | None]:
    """(hooks, d_model) the harvest will produce, where the manifest alone tells."""
    model = harvest.model
    n_layers, d_model = {
        "random": (model.n_layers, model.d_model),
        "packaged": PACKAGED_SHAPES.get(model.name, (None, None)),
    }.get(model.source, (None, None))
    if harvest.hooks.layers != "all":
        n_layers = len(harvest.hooks.layers)
    return n_layers, d_model


def check_variants(experiment: ExperimentManifest, base: Path, source: str) -> None:
    """Every variant's merged manifest and coder section, before anything is harvested.

    The coder section is checked against the harvest's shape where the manifest tells it;
    otherwise against a stand-in shape, ignoring what only the real shape decides."""
    harvest = load_harvest_manifest(base / experiment.harvest)
    n_hooks, d_model = _store_shape(harvest)
    for manifest, _ in variant_manifests(experiment, base, source):
        label = f"{source} (variant '{manifest.name}')"
        layers = manifest.layers
        if layers != "all" and n_hooks is not None and max(layers) >= n_hooks:
            raise ManifestError(
                f"{label}: field 'layers': {max(layers)} out of range: the harvest has "
                f"{n_hooks} hooks"
            )
        n = len(layers) if layers != "all" else (n_hooks or 2)
        try:
            check_coder_section(manifest, n, d_model or 1024, label)
        except ManifestError as err:
            lines = str(err).split("\n")
            shape_only = all("d_model" in line or "n_layers" in line for line in lines)
            if (d_model is not None and n_hooks is not None) or not shape_only:
                raise


def load_experiment(path: str | Path) -> tuple[ExperimentManifest, Path]:
    path = Path(path)
    experiment = load_manifest(ExperimentManifest, path)
    if not (path.parent / experiment.harvest).is_file():
        raise ManifestError(f"{path}: field 'harvest': no file {path.parent / experiment.harvest}")
    check_variants(experiment, path.parent, str(path))
    return experiment, path.parent
