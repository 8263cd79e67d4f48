"""The experiment manifest: one harvest, many coder variants, one evaluation.

Each variant is a coder manifest written as overrides of the shared ``defaults``
(deep-merged), so a sweep or an ablation is a few lines, and every variant trains from
the same cache. A variant may leave ``coder.n_latents`` to ``match``: the smallest
dictionary with at least another variant's parameters (``match: {params: <variant>}``) or
training-step multiply-adds per token (``match: {step_macs: <variant>}``,
``pipeline.coders.cost``), computed from the harvest's shape, so no count is written by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.coders import coder_config_from_dict
from pipeline.coders.cost import matching_latents, measure_fn
from pipeline.manifests.harvest import HarvestManifest, Strict, load_harvest_manifest
from pipeline.manifests.io import ManifestError, check_name, load_manifest, validate
from pipeline.training.manifest import CoderManifest, TrainingSpec, check_coder_section

# Known shapes (n_layers, d_model), so coder sections are checked before any harvest.
PACKAGED_SHAPES = {"smollm2-135m": (30, 576), "gemma3-270m": (18, 640)}
# What a variant's ``match`` can equal, and the coder kinds whose n_latents it sets.
MATCH_MEASURES = ("params", "step_macs")
MATCHABLE_KINDS = ("crosscoder", "fmxcoder")


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
        for index, variant in enumerate(self.variants):
            if "match" in variant:
                self._check_match(index, variant)
        return self

    def _check_match(self, index: int, variant: dict) -> None:
        """A ``match`` names one measure and an unmatched variant; the coder leaves
        n_latents to it."""
        where = f"variants[{index}] '{variant['name']}': field 'match'"
        match = variant["match"]
        if not (isinstance(match, dict) and len(match) == 1 and set(match) < set(MATCH_MEASURES)):
            shapes = ", ".join(f"{{{m}: <variant>}}" for m in MATCH_MEASURES)
            raise ValueError(f"{where}: must be one of {shapes}")
        measure, target = next(iter(match.items()))
        others = {v["name"]: v for v in self.variants}
        if target not in others or target == variant["name"]:
            raise ValueError(f"{where}.{measure}: no other variant named {target!r}")
        if "match" in others[target]:
            raise ValueError(f"{where}.{measure}: {target!r} is itself matched; name its target")
        kind = deep_merge(self.defaults, variant).get("coder", {}).get("kind")
        if kind not in MATCHABLE_KINDS:
            raise ValueError(f"{where}: sets n_latents, which a {kind!r} coder does not have")
        if "n_latents" in variant.get("coder", {}):
            raise ValueError(f"{where}: sets coder.n_latents; leave it out")


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
    """Every variant as a validated coder manifest naming the experiment's harvest, with
    ``match`` resolved to n_latents."""
    out = []
    for index, variant in enumerate(experiment.variants):
        data = deep_merge(experiment.defaults, variant)
        if "match" in data:
            data = _resolve_match(experiment, base, data, f"{source} (variants[{index}])")
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


def _coder_shape(experiment: ExperimentManifest, base: Path, data: dict, where: str) -> dict:
    """``n_layers`` and ``d_model`` of a variant's coder, from the harvest manifest."""
    n_hooks, d_model = _store_shape(load_harvest_manifest(base / experiment.harvest))
    layers = data.get("layers", "all")
    n_layers = n_hooks if layers == "all" else len(layers)
    if n_layers is None or d_model is None:
        raise ManifestError(
            f"{where}: field 'match': needs the harvest's layer count and width, which "
            f"{experiment.harvest} does not tell (model source or name); set coder.n_latents"
        )
    return {"n_layers": n_layers, "d_model": d_model}


def _config(coder: dict, shape: dict, where: str) -> Any:
    """A coder section at the harvest's shape, its errors named as the manifest's."""
    try:
        return coder_config_from_dict({**coder, **shape})
    except ValueError as err:
        raise ManifestError(f"{where}: field 'match': {err}") from None


def _resolve_match(experiment: ExperimentManifest, base: Path, data: dict, where: str) -> dict:
    """``data`` with its ``match`` replaced by ``coder.n_latents``: the smallest with at
    least the target variant's measure (the same rule as a count worked out by hand)."""
    measure, target = next(iter(data.pop("match").items()))
    default_batch = TrainingSpec.model_fields["batch_size"].default
    batch = data.get("training", {}).get("batch_size", default_batch)
    target_data = next(
        deep_merge(experiment.defaults, v) for v in experiment.variants if v["name"] == target
    )
    shape = _coder_shape(experiment, base, target_data, where)
    target_batch = target_data.get("training", {}).get("batch_size", default_batch)
    goal = measure_fn(measure, target_batch)(_config(target_data["coder"], shape, where))
    shape = _coder_shape(experiment, base, data, where)
    start = max(data["coder"].get("k") or 1, 1)
    template = _config({**data["coder"], "n_latents": start}, shape, where)
    n = matching_latents(template, measure, goal, batch)
    if n is None:
        raise ManifestError(f"{where}: field 'match.{measure}': no n_latents reaches {goal:,.0f}")
    return deep_merge(data, {"coder": {"n_latents": n}})


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
