"""The ``pipeline`` command: thin wrappers that turn library errors into one clear line."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import click

from pipeline.assets import AssetError
from pipeline.locks import LockedError
from pipeline.store import StoreError

# ValueError covers ManifestError, ModelError, TextSourceError, CorpusTooSmallError and
# CheckpointError.
USER_ERRORS = (StoreError, AssetError, FileNotFoundError, ValueError, LockedError)


def user_errors(command):
    """Report expected failures as ``Error: <message>`` and exit 1, without a traceback
    (``pipeline --debug ...`` lets them through, traceback and all)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as err:
            context = click.get_current_context(silent=True)
            if context is not None and (context.find_root().obj or {}).get("debug"):
                raise
            raise click.ClickException(str(err)) from None

    return wrapper


cache_root_option = click.option(
    "--cache-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Store root (default: $FMX_CACHE_DIR or ~/.cache/fmxcoders/cache).",
)


@click.group()
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.pass_context
def main(context: click.Context, debug: bool) -> None:
    """Harvest activations, train cross-layer sparse coders, evaluate them.

    \b
    Example:
      pipeline harvest manifests/harvest/smollm2-wiki-smoke.yaml
      pipeline --debug ls
    """
    context.obj = {"debug": debug}


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@cache_root_option
@click.option("--device", default=None, help="Override run.device (cpu, cuda, cuda:1).")
@click.option("--batch-size", type=int, default=None, help="Override run.batch_size.")
# --- distributed harvest (stages/distributed_harvest.py) ---
@click.option(
    "--scheduler",
    default=None,
    help="Harvest on dask workers: a scheduler address (tcp://host:8786), or local:N to "
    "start N worker processes here. The store must be on a filesystem the workers share.",
)
@click.option(
    "--shard-blocks",
    type=click.IntRange(min=1),
    default=None,
    help="Blocks per dask task (the unit of retry); default: about 4 tasks per worker.",
)
# --- end distributed harvest ---
@user_errors
def harvest(
    manifest: Path,
    cache_root: Path | None,
    device: str | None,
    batch_size: int | None,
    scheduler: str | None,
    shard_blocks: int | None,
):
    """Run the model over the manifest's text and store every hooked layer.

    A second run with the same manifest is a cache hit; a killed run resumes.

    \b
    Example:
      pipeline harvest manifests/harvest/smollm2-wiki-smoke.yaml
      pipeline harvest manifests/harvest/smollm2-wiki-smoke.yaml --scheduler local:2
    """
    from pipeline.harvest_manifest import load_harvest_manifest
    from stages import harvest as harvest_stage

    spec = load_harvest_manifest(manifest)
    overrides = {k: v for k, v in {"device": device, "batch_size": batch_size}.items() if v}
    if overrides:
        spec = spec.model_copy(update={"run": spec.run.model_copy(update=overrides)})
    result = harvest_stage.run(
        spec, cache_root, str(manifest), scheduler=scheduler, shard_blocks=shard_blocks
    )
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
@click.option(
    "--verify", is_flag=True, help="Check every file's and every decoded chunk's checksum."
)
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
        click.echo("verified: every file and chunk matches its checksum")


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
      torchrun --nproc-per-node 2 $(which pipeline) train manifests/coders/tiny-crosscoder.yaml
    """
    from pipeline.train_manifest import load_coder_manifest
    from stages import train as train_stage

    loaded = []
    for path in manifests:
        spec, base = load_coder_manifest(path)
        if device:
            spec = spec.model_copy(update={"run": spec.run.model_copy(update={"device": device})})
        loaded.append((spec, base))
    results = train_stage.run(loaded)
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 alone reports
        return
    for result in results:
        status = "already trained" if result.skipped else f"{result.steps} steps"
        click.echo(f"{result.name:<28}{status:<18}{result.run_dir}")


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Report directory (default: $FMX_DATA_DIR/reports/<cache key>-<digest>).",
)
@click.option(
    "--judge",
    type=click.Choice(["purity", "openai", "transformers"]),
    default="purity",
    show_default=True,
    help="purity: offline proxy; openai: FMX_JUDGE_BASE_URL/MODEL/API_KEY; transformers: "
    "the packaged SmolLM2-Instruct (weak, offline).",
)
@click.option(
    "--max-tokens", type=click.IntRange(min=1), default=None, help="Cap on held-out tokens."
)
@click.option(
    "--latents-sampled",
    type=click.IntRange(min=0),
    default=24,
    show_default=True,
    help="Alive latents per variant that are judged and get a report page.",
)
@click.option("--no-splice", is_flag=True, help="Skip the spliced-in CE/KL score (no model load).")
@click.option(
    "--splice-windows",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Context windows scored by the splice (each costs one forward per layer and variant).",
)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, auto.")
@cache_root_option
@user_errors
def evaluate(
    runs: tuple[Path, ...],
    out: Path | None,
    judge: str,
    max_tokens: int | None,
    latents_sampled: int,
    no_splice: bool,
    splice_windows: int,
    device: str,
    cache_root: Path | None,
) -> None:
    """Evaluate trained variants side by side on the cache's held-out documents.

    RUNS are run directories, checkpoint directories or coder manifests. Writes each
    variant's metrics into its run directory, and tables, plots and an HTML report
    (index.html) into the report directory.

    \b
    Example:
      pipeline evaluate manifests/coders/tiny-crosscoder.yaml manifests/coders/tiny-fmxcoder.yaml
      pipeline evaluate runs/2aedd5f3*/* --max-tokens 4096 --no-splice --out report/
    """
    from pipeline.evaluation.judge import JudgeError
    from pipeline.evaluation.results import format_table, read_summaries
    from stages import evaluate as evaluate_stage

    options = evaluate_stage.EvaluateOptions(
        judge=judge,
        latents_sampled=latents_sampled,
        max_tokens=max_tokens,
        splice=not no_splice,
        splice_windows=splice_windows,
        device=device,
        cache_root=cache_root,
    )
    try:
        report = evaluate_stage.run(list(runs), out, options)
    except JudgeError as err:
        raise click.ClickException(f"judge: {err}") from None
    click.echo(format_table(read_summaries(report)))
    click.echo(f"\nreport: {report / 'index.html'}")


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@user_errors
def compare(runs: tuple[Path, ...]) -> None:
    """Print saved evaluation results of several variants side by side.

    RUNS are run directories (their latest evaluation) or report directories.

    \b
    Example:
      pipeline compare ~/.cache/fmxcoders/runs/2aedd5f32f234901/*
    """
    from pipeline.evaluation.results import format_table, read_summaries

    rows = [row for run in runs for row in read_summaries(run)]
    click.echo(format_table(rows))


@main.command(name="run")
@click.argument("experiment", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--results",
    "results_root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where results/<name>/ goes (default: ./results).",
)
@click.option("--device", default=None, help="Override every device setting (cpu, cuda).")
@user_errors
def run_experiment(experiment: Path, results_root: Path | None, device: str | None) -> None:
    """Harvest once, train every variant, evaluate them, write the paper's table.

    Each step is skipped when its output exists, so an interrupted experiment resumes.

    \b
    Example:
      pipeline run manifests/experiments/smoke.yaml
    """
    from pipeline.results_table import render_markdown
    from stages import experiment as experiment_stage

    result = experiment_stage.run(experiment, results_root, device)
    summary = json.loads((result.results / "report" / "results.json").read_text())
    click.echo(render_markdown(result.table, summary))
    click.echo(f"results: {result.results}  (report: {result.results / 'report' / 'index.html'})")
