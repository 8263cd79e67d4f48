"""The ``pipeline`` command: thin wrappers that turn library errors into one clear line."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import click

from pipeline.assets import AssetError
from pipeline.manifest_io import ManifestError
from pipeline.models import ModelError
from pipeline.store import StoreError
from pipeline.text_sources import TextSourceError
from pipeline.windows import CorpusTooSmallError

USER_ERRORS = (
    ManifestError,
    StoreError,
    ModelError,
    TextSourceError,
    AssetError,
    CorpusTooSmallError,
    FileNotFoundError,
    ValueError,
)


def user_errors(command):
    """Report expected failures as ``Error: <message>`` and exit 1, without a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as err:
            raise click.ClickException(str(err)) from None

    return wrapper


cache_root_option = click.option(
    "--cache-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Store root (default: $FMX_CACHE_DIR or ~/.cache/fmxcoders/cache).",
)


@click.group()
def main() -> None:
    """Harvest activations, train cross-layer sparse coders, evaluate them.

    \b
    Example:
      pipeline harvest manifests/harvest/smollm2-wiki-smoke.yaml
      pipeline ls
    """


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@cache_root_option
@click.option("--device", default=None, help="Override run.device (cpu, cuda, cuda:1).")
@click.option("--batch-size", type=int, default=None, help="Override run.batch_size.")
@user_errors
def harvest(manifest: Path, cache_root: Path | None, device: str | None, batch_size: int | None):
    """Run the model over the manifest's text and store every hooked layer.

    A second run with the same manifest is a cache hit; a killed run resumes.

    \b
    Example:
      pipeline harvest manifests/harvest/smollm2-wiki-smoke.yaml
    """
    from pipeline.harvest_manifest import load_harvest_manifest
    from stages import harvest as harvest_stage

    spec = load_harvest_manifest(manifest)
    overrides = {k: v for k, v in {"device": device, "batch_size": batch_size}.items() if v}
    if overrides:
        spec = spec.model_copy(update={"run": spec.run.model_copy(update=overrides)})
    result = harvest_stage.run(spec, cache_root, manifest_source=str(manifest))
    status = (
        "cache hit" if result.cache_hit else f"harvested at {result.tokens_per_second:,.0f} tok/s"
    )
    click.echo(f"{result.key}  {status}  {result.path}")


@main.command(name="ls")
@cache_root_option
@user_errors
def list_caches(cache_root: Path | None) -> None:
    """List activation caches: tokens, layers, size on disk, completeness.

    \b
    Example:
      pipeline ls --cache-root /scratch/fmx
    """
    from pipeline.catalog import list_stores

    rows = list_stores(cache_root)
    if not rows:
        click.echo("no caches")
        return
    click.echo(f"{'key':<18}{'status':<12}{'tokens':>10}{'layers':>8}{'size':>11}  model")
    for row in rows:
        click.echo(
            f"{row.key:<18}{row.status:<12}{row.tokens:>10}{row.layers:>8}"
            f"{row.size_mb:>9.1f}MB  {row.model}"
        )


@main.command()
@click.argument("key")
@cache_root_option
@click.option("--verify", is_flag=True, help="Decode every chunk and check its checksum.")
@user_errors
def show(key: str, cache_root: Path | None, verify: bool) -> None:
    """Show a cache's manifest and normalisation statistics.

    \b
    Example:
      pipeline show 8cdf9041252243f5 --verify
    """
    from pipeline.catalog import find_store

    store = find_store(key, cache_root, verify=verify)
    click.echo(json.dumps(store.manifest["manifest"], indent=2))
    stats = store.stats
    click.echo(f"\ntokens {store.n_tokens}  d_model {store.d_model}  dtype {store.dtype}")
    click.echo(f"{'hook':<28}{'mean norm':>12}{'rms norm':>12}{'|mean|':>10}")
    for j, name in enumerate(store.hook_names):
        click.echo(
            f"{name:<28}{stats['mean_norm'][j]:>12.3f}{stats['rms_norm'][j]:>12.3f}"
            f"{stats['mean'][j].norm():>10.3f}"
        )
    if verify:
        click.echo("verified: every chunk matches its checksum")


@main.command()
@click.argument(
    "manifests", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path)
)
@click.option("--device", default=None, help="Override run.device of every manifest.")
@user_errors
def train(manifests: tuple[Path, ...], device: str | None) -> None:
    """Train coder variants from an existing cache (never harvests).

    Variants on the same cache, layers and batch settings share one pass of data loading.
    A killed run resumes from its last checkpoint; a finished one is skipped.

    \b
    Example:
      pipeline train manifests/coders/smoke-crosscoder.yaml manifests/coders/smoke-fmxcoder.yaml
    """
    from pipeline.train_manifest import load_coder_manifest
    from stages import train as train_stage

    loaded = []
    for path in manifests:
        spec, base = load_coder_manifest(path)
        if device:
            spec = spec.model_copy(update={"run": spec.run.model_copy(update={"device": device})})
        loaded.append((spec, base))
    for result in train_stage.run(loaded):
        status = "already trained" if result.skipped else f"{result.steps} steps"
        click.echo(f"{result.name:<28}{status:<18}{result.run_dir}")
