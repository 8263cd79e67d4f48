"""The ``pipeline`` command: thin wrappers that turn library errors into one clear line."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path

import click

# Only click and the standard library at import time: `pipeline --help` must feel instant
# (bench/cli.py), so torch, zarr, dask and transformer_lens load inside the commands.

# ValueError covers ManifestError, ModelError, TextSourceError, CorpusTooSmallError, ExportError.
BUILTIN_USER_ERRORS = (FileNotFoundError, ValueError)
# Raised only by modules a command has already imported, so looked up there, not imported.
LAZY_USER_ERRORS = (
    ("pipeline.store.reader", "StoreError"),
    ("pipeline.harvest.assets", "AssetError"),
    ("pipeline.store.locks", "LockedError"),
)


SIGTERM_EXIT = 143  # 128 + SIGTERM, what a shell and a scheduler expect
_terminated: list[int] = []  # set by the SIGTERM handler


def _on_sigterm(signum, frame) -> None:
    """SIGTERM (a scheduler's preemption) unwinds like Ctrl-C: every ``finally`` runs, so
    locks are released and what was written stays resumable; ``user_errors`` then
    prints one line and exits 143."""
    _terminated.append(signum)
    raise KeyboardInterrupt


def _restore_sigterm(previous) -> None:
    """Put back the handler a command replaced (tests run many commands in one process)."""
    signal.signal(signal.SIGTERM, previous)
    _terminated.clear()


def _resource_message(err: BaseException) -> str | None:
    """Disk full and out-of-memory anywhere, as one line naming the path or the figure."""
    import errno

    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"{err.filename or 'a file'}: no space left on device; free space and rerun "
            "(the partial work is kept and resumes)"
        )
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, MemoryError) or (
        isinstance(err, RuntimeError) and ("out of memory" in first or "allocate" in first)
    ):
        return f"out of memory: {first or type(err).__name__}; use a smaller coder or batch"
    return None


def is_user_error(err: BaseException) -> bool:
    """Expected failures (bad input, missing cache) rather than bugs."""
    if isinstance(err, BUILTIN_USER_ERRORS) or _resource_message(err) is not None:
        return True
    for module, name in LAZY_USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(err, cls):
            return True
    return False


def user_errors(command):
    """Report expected failures as ``Error: <message>`` and exit 1, without a traceback
    (``pipeline --debug ...`` lets them through, traceback and all)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            if not _terminated:
                raise
            click.echo(
                "Error: stopped by SIGTERM; locks released, the partial work is kept: "
                "rerun the same command to resume",
                err=True,
            )
            sys.exit(SIGTERM_EXIT)
        except Exception as err:
            if not is_user_error(err):
                raise
            context = click.get_current_context(silent=True)
            if context is not None and context.find_root().params.get("debug"):
                raise
            raise click.ClickException(_resource_message(err) or str(err)) from None

    return wrapper


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fmxcoders")
    except PackageNotFoundError:  # run from a checkout without `pip install -e .`
        return "0.1.0+checkout"


cache_root_option = click.option(
    "--cache-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Store root (default: $FMX_CACHE_DIR or ~/.cache/fmxcoders/cache).",
)


@click.group()
@click.version_option(_version(), "--version", prog_name="pipeline")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars; warnings and errors only.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.pass_context
def main(ctx: click.Context, quiet: bool, verbose: int, debug: bool) -> None:
    """Harvest activations, train cross-layer sparse coders, evaluate them.

    \b
    Example:
      pipeline harvest manifests/harvest/smollm2-wiki-smoke.yaml
      pipeline ls
      pipeline runs
      pipeline --debug ls
    """
    level = (
        logging.WARNING
        if quiet
        else [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    )
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if threading.current_thread() is threading.main_thread():
        previous_handler = signal.signal(signal.SIGTERM, _on_sigterm)
        ctx.call_on_close(functools.partial(_restore_sigterm, previous_handler))
    if quiet:  # every tqdm bar (harvest, train, evaluate) reads TQDM_DISABLE
        previous = os.environ.get("TQDM_DISABLE")
        os.environ["TQDM_DISABLE"] = "1"
        ctx.call_on_close(functools.partial(_restore_env, "TQDM_DISABLE", previous))


def quiet() -> bool:
    """Whether ``pipeline -q`` was given (commands then turn their progress bars off)."""
    return bool(click.get_current_context().find_root().params.get("quiet"))


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


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
    from pipeline.manifests.harvest import load_harvest_manifest
    from stages import harvest as harvest_stage

    spec = load_harvest_manifest(manifest)
    overrides = {k: v for k, v in {"device": device, "batch_size": batch_size}.items() if v}
    if quiet():
        overrides["progress"] = False
    if overrides:
        spec = spec.model_copy(update={"run": spec.run.model_copy(update=overrides)})
    result = harvest_stage.run(
        spec, cache_root, str(manifest), scheduler=scheduler, shard_blocks=shard_blocks
    )
    status = (
        "cache hit" if result.cache_hit else f"harvested at {result.tokens_per_second:,.0f} tok/s"
    )
    if result.cache_hit:  # opening it checked sizes and table checksums, not every chunk
        click.echo(
            f"note: cache hit not fully verified (chunks unread): `pipeline show {result.key} "
            "--verify` decodes every chunk",
            err=True,
        )
    click.echo(f"{result.key}  {status}  {result.path}")


@main.command()
@click.argument("key")
@click.option(
    "--dtype",
    type=click.Choice(["int8", "float8_e4m3"]),
    required=True,
    help="The 8-bit storage dtype to derive (README 'Storage dtypes').",
)
@cache_root_option
@user_errors
def convert(key: str, dtype: str, cache_root: Path | None) -> None:
    """Derive an 8-bit store from a finished bf16 store, without the model.

    Same tokens and documents tables, a new key (the one a harvest of the manifest with
    that storage.dtype would get); a killed convert resumes.

    \b
    Example:
      pipeline convert 8cdf9041252243f5 --dtype int8
    """
    from stages import convert as convert_stage

    result = convert_stage.run(key, dtype, cache_root)
    status = (
        "cache hit" if result.cache_hit else f"converted at {result.tokens_per_second:,.0f} tok/s"
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
    from pipeline.store.catalog import list_stores

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
    from pipeline.store.catalog import find_record, find_store, model_facts, shown_manifest

    # --verify decodes every chunk (torch, zarr); otherwise the checked record suffices
    store = find_store(key, cache_root, verify=True) if verify else find_record(key, cache_root)
    click.echo(json.dumps(shown_manifest(store.manifest), indent=2))
    click.echo(f"\n{model_facts(store.manifest)}")
    click.echo(f"\ntokens {store.n_tokens}  d_model {store.d_model}  dtype {store.dtype}")
    click.echo(f"{'hook':<28}{'mean norm':>12}{'rms norm':>12}{'|mean|':>10}")
    for name, mean_norm, rms_norm, mean in store.hook_statistics():
        click.echo(f"{name:<28}{mean_norm:>12.3f}{rms_norm:>12.3f}{mean:>10.3f}")
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
    from pipeline.training.manifest import load_coder_manifest
    from stages import train as train_stage

    loaded = []
    for path in manifests:
        spec, base = load_coder_manifest(path)
        run_overrides = {"device": device} if device else {}
        if quiet():
            run_overrides["progress"] = False
        if run_overrides:
            spec = spec.model_copy(update={"run": spec.run.model_copy(update=run_overrides)})
        loaded.append((spec, base))
    results = train_stage.run(loaded)
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 alone reports
        return
    for result in results:
        status = "already trained" if result.skipped else f"{result.steps} steps"
        click.echo(f"{result.name:<28}{status:<18}{result.run_dir}")


def resolve_runs(targets: tuple[str, ...], runs_root: Path | None = None) -> list[Path]:
    """Paths as given; anything else is a run's name or hash prefix (``pipeline runs``)."""
    from pipeline.store.catalog import find_run

    return [Path(t) if Path(t).exists() else find_run(t, runs_root) for t in targets]


runs_root_option = click.option(
    "--runs-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Runs root (default: $FMX_RUNS_DIR or ~/.cache/fmxcoders/runs).",
)


@main.command()
@click.argument("runs", nargs=-1, required=True)
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
    "--judge-fallback",
    is_flag=True,
    help="If the judge fails (after retries), rate with the purity proxy instead of "
    "stopping; the table then says so.",
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
    judge_fallback: bool,
    max_tokens: int | None,
    latents_sampled: int,
    no_splice: bool,
    splice_windows: int,
    device: str,
    cache_root: Path | None,
) -> None:
    """Evaluate trained variants side by side on the cache's held-out documents.

    RUNS are run directories, checkpoint directories, coder manifests, or a run's name or
    hash prefix as `pipeline runs` lists them. Writes each
    variant's metrics into its run directory, and tables, plots and an HTML report
    (index.html) into the report directory.

    \b
    Example:
      pipeline evaluate manifests/coders/tiny-crosscoder.yaml manifests/coders/tiny-fmxcoder.yaml
      pipeline evaluate runs/2aedd5f3*/* --max-tokens 4096 --no-splice --out report/
      pipeline evaluate fmxcoder crosscoder --no-splice
    """
    from pipeline.evaluation.judge import JudgeError
    from pipeline.evaluation.results import format_table, read_summaries
    from stages import evaluate as evaluate_stage

    options = evaluate_stage.EvaluateOptions(
        judge=judge,
        judge_fallback=judge_fallback,
        latents_sampled=latents_sampled,
        max_tokens=max_tokens,
        splice=not no_splice,
        splice_windows=splice_windows,
        device=device,
        cache_root=cache_root,
        progress=not quiet(),
    )
    try:
        report = evaluate_stage.run(resolve_runs(runs), out, options)
    except JudgeError as err:
        raise click.ClickException(f"judge: {err}") from None
    rows = read_summaries(report)
    click.echo(format_table(rows))
    for row in rows:
        if str(row.get("judge", "")).startswith("purity (fallback"):
            click.echo(f"note: {row['variant']}: 'coherent' is the {row['judge']}")
    click.echo(f"\nreport: {report / 'index.html'}")


@main.command()
@click.argument("runs", nargs=-1, required=True)
@user_errors
def compare(runs: tuple[str, ...]) -> None:
    """Print saved evaluation results of several variants side by side.

    RUNS are run directories (their latest evaluation), report directories, or run names
    or hash prefixes (`pipeline runs`).

    \b
    Example:
      pipeline compare ~/.cache/fmxcoders/runs/2aedd5f32f234901/*
    """
    from pipeline.evaluation.results import format_table, read_summaries

    rows = [row for run in resolve_runs(runs) for row in read_summaries(run)]
    click.echo(format_table(rows))


@main.command(name="report")
@click.argument("results", type=click.Path(file_okay=False, path_type=Path))
@user_errors
def report_command(results: Path) -> None:
    """Redraw a report's figures and pages from its saved tables (no runs, no cache).

    RESULTS is a report directory (it holds results.json) or an experiment's results
    directory (its report/; its protocol.json then labels the runs, so that a report
    evaluated before runs were labelled folds seeds all the same).

    \b
    Example:
      pipeline report results/cpu-large
    """
    from pipeline.evaluation.html_report import rerender
    from pipeline.paths import ExperimentPaths, ReportPaths

    experiment = ExperimentPaths(results)
    root = results if (results / "results.json").is_file() else experiment.report
    if not (root / "results.json").is_file():
        raise FileNotFoundError(f"{results}: no results.json here or in its report/")
    protocol = experiment.protocol_labels
    labels = json.loads(protocol.read_text()) if root != results and protocol.is_file() else None
    click.echo(rerender(ReportPaths(root), labels))


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
    from pipeline.experiment.results_table import render_markdown
    from stages import experiment as experiment_stage

    result = experiment_stage.run(experiment, results_root, device)
    summary = json.loads((result.results / "report" / "results.json").read_text())
    click.echo(render_markdown(result.table, summary))
    click.echo(f"results: {result.results}  (report: {result.results / 'report' / 'index.html'})")


@main.command(name="runs")
@runs_root_option
@user_errors
def list_runs(runs_root: Path | None) -> None:
    """List training runs: name, cache, kind, steps, FVU, L0 and state.

    State is complete (final/ written and its checksums verify), untrained (a tokens: 0
    control), running (metrics logged in the last 5 minutes), incomplete (stopped;
    `pipeline train` resumes it) or broken (file: reason) for a run that fails a check.
    A complete run's FVU and L0 are its last training step's, read from the checksummed
    final/summary.json; an unfinished run's come from its latest metrics.jsonl line.
    Each run directory also holds a `name` file with its manifests' names.

    \b
    Example:
      pipeline runs
      pipeline export per-layer-sae --format saelens exported/
    """
    from pipeline.store.catalog import list_runs as catalog_runs

    rows = catalog_runs(runs_root)
    if not rows:
        click.echo("no runs")
        return
    width = max(24, *(len(r.name) + 2 for r in rows))  # whole names: they are what you type
    click.echo(
        f"{'name':<{width}}{'cache':<18}{'run':<14}{'kind':<15}{'steps':>12}{'FVU':>8}{'L0':>8}"
        "  state"
    )
    for r in rows:
        steps = f"{r.steps}/{r.total_steps}"
        fvu = "-" if math.isnan(r.fvu) else f"{r.fvu:.3f}"
        l0 = "-" if math.isnan(r.l0) else f"{r.l0:.1f}"
        click.echo(
            f"{r.name:<{width}}{r.cache[:17]:<18}{r.run_hash:<14}{r.kind:<15}{steps:>12}"
            f"{fvu:>8}{l0:>8}  {r.state}"
        )


@main.command()
@click.argument("run")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["saelens", "dictionary_learning"]),
    required=True,
    help="saelens: per-layer SAE runs, one folder per layer; dictionary_learning: "
    "crosscoders and fmxcoders as a CrossCoder (factorised weights expanded).",
)
@runs_root_option
@cache_root_option
@user_errors
def export(run: str, out: Path, fmt: str, runs_root: Path | None, cache_root: Path | None) -> None:
    """Write a trained run in another library's format, normalisation folded in.

    RUN is a run directory, a checkpoint directory, or a run's name or hash prefix.
    The exported dictionary takes raw activations (no cache needed to use it). A TopK
    crosscoder's dictionary_learning export reads its cache's training split once, to set
    the threshold at which the library's forward fires k latents per token.

    \b
    Example:
      pipeline export per-layer-sae --format saelens exported/sae
      pipeline export fmxcoder --format dictionary_learning exported/fmx
    """
    from pipeline.training.export import export_run

    (target,) = resolve_runs((run,), runs_root)
    checkpoint = target if (target / "coder.json").is_file() else target / "final"
    if not (checkpoint / "coder.json").is_file():
        raise click.ClickException(f"{target}: no final checkpoint yet (still training?)")
    for path in export_run(checkpoint, fmt, out, cache_root):
        click.echo(str(path))


def _open_spectrum_cache(cache: str, cache_root: Path | None):
    """A store from a key, a key prefix, or a harvest manifest's path."""
    from pipeline.store.catalog import find_store

    path = Path(cache)
    if path.is_file():
        from pipeline.harvest.cache_key import cache_key
        from pipeline.manifests.harvest import load_harvest_manifest

        harvest = load_harvest_manifest(path)
        if cache_root is None and harvest.run.cache_root:
            cache_root = Path(harvest.run.cache_root)
        return find_store(cache_key(harvest), cache_root)
    return find_store(cache, cache_root)


def _parse_ints(text: str, option: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        message = f"{text!r}: expected integers like 0,3,5"
        raise click.BadParameter(message, param_hint=option) from None


@main.command()
@click.argument("cache")
@cache_root_option
@click.option("--layers", default="all", help="Hook indices: 'all' or a list like 0,3,5.")
@click.option("--centre/--no-centre", default=True, help="Centre each layer (as training).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Cap the tokens.")
@click.option(
    "--cp-ranks",
    default=None,
    help="Also print the cp floor at these ranks (e.g. 256,1024,2560), on a token sample.",
)
@click.option(
    "--cp-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Tokens in the cp sample (default: pipeline.evaluation.spectrum.CP_SAMPLE_TOKENS).",
)
@click.option(
    "--outlier-ratio",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Drop tokens whose norm at any layer exceeds this multiple of the layer median "
    "(massive activations), as training does; 0 keeps every token.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@user_errors
def spectrum(
    cache: str,
    cache_root: Path | None,
    layers: str,
    centre: bool,
    max_tokens: int | None,
    cp_ranks: str | None,
    cp_tokens: int | None,
    outlier_ratio: float,
    as_json: bool,
) -> None:
    """Floor FVU of a rank-R shared layer basis, R = 1..L, on the training split.

    CACHE is a cache key, a key prefix, or a harvest manifest. The floor is the best FVU
    (mean over layers, as `evaluate`) any decoder whose layer axis lies in a fixed R-dim
    span can reach: `shared_basis` at rank R. Reads the split once, chunk by chunk.

    \b
    Example:
      pipeline spectrum manifests/harvest/smollm2-wiki-cpu-large.yaml --layers all
      pipeline spectrum 8cdf9041 --cp-ranks 256,1024,2560 --json
    """
    if 0 < outlier_ratio <= 1:  # the option checks first: opening a store imports torch
        raise click.BadParameter(
            "must be above 1 (or 0 to keep every token)", param_hint="--outlier-ratio"
        )
    ratio = outlier_ratio or None
    ranks = _parse_ints(cp_ranks, "--cp-ranks") if cp_ranks else None
    picked = "all" if layers == "all" else _parse_ints(layers, "--layers")
    from pipeline.evaluation import spectrum as sp

    store = _open_spectrum_cache(cache, cache_root)
    chosen = sp.store_layers(store, picked)
    if ranks and len(chosen) * store.d_model > sp.CP_MAX_DIM:  # before the first pass
        raise click.BadParameter(
            f"the cp floor needs L*d <= {sp.CP_MAX_DIM}; {len(chosen)} layers x d_model "
            f"{store.d_model} = {len(chosen) * store.d_model}: choose fewer with --layers",
            param_hint="--cp-ranks",
        )
    rows, n_tokens = sp.store_spectrum(store, chosen, centre, max_tokens, ratio)
    cp = None
    if ranks:
        cp, cp_n = sp.store_cp_floors(
            store, chosen, centre, ranks, cp_tokens or sp.CP_SAMPLE_TOKENS, ratio
        )
    if as_json:
        table = [{"rank": r.rank, "share": r.share, "floor_fvu": r.floor_fvu} for r in rows]
        if cp is None:
            click.echo(json.dumps(table, indent=1))
        else:
            cp_rows = [{"rank": k, "floor_fvu": v, "tokens": cp_n} for k, v in cp.items()]
            click.echo(json.dumps({"layer": table, "cp": cp_rows}, indent=1))
        return
    click.echo(f"cache {store.key}  layers {len(chosen)}  tokens {n_tokens:,}  centre {centre}")
    if ratio is not None:
        from pipeline.store.outliers import outlier_scan

        click.echo(f"excluded: {outlier_scan(store, ratio).summary()}")
    click.echo(f"{'rank':>6}{'share':>10}{'floor FVU':>12}")
    for r in rows:
        click.echo(f"{r.rank:>6}{r.share:>10.4f}{r.floor_fvu:>12.4f}")
    if cp is not None:
        click.echo(f"\ncp floor (sample of {cp_n:,} tokens, a lower bound)")
        click.echo(f"{'rank':>6}{'floor FVU':>12}")
        for rank, value in cp.items():
            click.echo(f"{rank:>6}{value:>12.4f}")


@main.command(name="trajectories")
@click.argument("runs", nargs=-1, required=True)
@click.option(
    "--units",
    type=click.Choice(["raw", "normalised"]),
    default="raw",
    show_default=True,
    help="raw: each layer's normalisation undone (as evaluate); normalised: the units the "
    "training loss weighs, where every layer has the same mean norm.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@cache_root_option
@user_errors
def trajectories_command(
    runs: tuple[str, ...], units: str, as_json: bool, cache_root: Path | None
) -> None:
    """How each latent's per-layer directions move across layers (multi-layer coders).

    RUNS are run directories, coder manifests, or run names or hash prefixes (`pipeline
    runs`). Per latent not dead at the end of training, on its [L, d] decoder and encoder in
    raw units: energy share in the top 1/2/3 singular directions, mean adjacent-layer and
    first-to-last cosine, and layers carrying it (norm >= 0.25 of its peak layer's). Prints
    the 10th, 50th and 90th percentile. Reads the weights only (and the cache's scales).

    \b
    Example:
      pipeline trajectories smoke-crosscoder smoke-fmxcoder
      pipeline trajectories manifests/coders/tiny-crosscoder.yaml --units normalised --json
    """
    import torch

    from pipeline.evaluation import trajectories as tr
    from pipeline.evaluation.results import clean
    from stages.evaluate import EvaluateOptions, load_variants

    options = EvaluateOptions(cache_root=cache_root)
    _, variants = load_variants(resolve_runs(runs), options, torch.device("cpu"))
    rows = []
    for v in variants:
        traj = tr.coder_trajectories(v.coder, v.scale)
        if traj is None:
            click.echo(f"{v.name}: per-layer latents have no trajectory", err=True)
            continue
        alive = ~v.coder.dead_latents().cpu().numpy().astype(bool)
        sides = ("dec", "enc") if units == "raw" else ("dec_norm", "enc_norm")
        rows += tr.quantile_rows(v.name, traj, alive, sides)
    if as_json:
        click.echo(json.dumps(clean(rows), indent=1))
    elif rows:
        click.echo(tr.format_quantiles(rows))


@main.group(name="collate")
def collate_group() -> None:
    """Tables across experiments: several `pipeline run` results directories side by side.

    \b
    Example:
      pipeline collate families results/planted results/planted-* --out results/planted
      pipeline collate trend results/scale/scale-* --out results/scale
    """


def _collate_experiments(dirs: tuple[Path, ...]) -> list:
    from pipeline.experiment import collate

    return [collate.load_experiment(d) for d in dirs]


@collate_group.command(name="families")
@click.argument("results_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder for families.md and families.json.")  # fmt: skip
@user_errors
def collate_families(results_dirs: tuple[Path, ...], out: Path) -> None:
    """Planted recovery per drift family: one planted experiment per family, each variant's
    share of true features recovered per kind (single, spanning, co-occurring) and its FVU.

    \b
    Example:
      pipeline collate families results/planted results/planted/planted-* --out results/planted
    """
    from pipeline.experiment import collate

    rows = collate.family_recovery(_collate_experiments(results_dirs))
    markdown = collate.render_families(rows)
    for path in collate.write(rows, markdown, out, "families"):
        click.echo(f"wrote {path}")
    click.echo(markdown)


@collate_group.command(name="trend")
@click.argument("results_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder for trend.md, trend.json and trend.png.")  # fmt: skip
@user_errors
def collate_trend(results_dirs: tuple[Path, ...], out: Path) -> None:
    """fmxcoder vs crosscoder (same latents, same parameters) against training tokens:
    MSE ratio and probe-F1 difference, paired by seed, from experiments that differ in
    their training budget.

    \b
    Example:
      pipeline collate trend results/scale/scale-* --out results/scale
    """
    from pipeline.experiment import collate

    rows = collate.scale_trend(_collate_experiments(results_dirs))
    markdown = collate.render_trend(rows)
    paths = collate.write(rows, markdown, out, "trend")
    paths.append(collate.plot_trend(rows, out / "trend.png"))
    for path in paths:
        click.echo(f"wrote {path}")
    click.echo(markdown)


if __name__ == "__main__":
    main()
