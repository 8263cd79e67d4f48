"""Evaluate stage: trained runs + their cache -> metrics, tables, plots and an HTML report.

Every variant is evaluated on the same held-out (test-split) tokens in one streaming pass
(``pipeline.evaluation.run_metrics``); the probes, the sampled latents' pages, the judge
and the spliced-in loss follow. Each variant's results go into its run directory (for
``pipeline compare``) and the side-by-side report into ``out_dir``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.evaluation import bootstrap, html_report, recovery, report, trajectories
from pipeline.evaluation import latent_details as ld
from pipeline.evaluation import results as tables
from pipeline.evaluation.concepts import build_gazetteer
from pipeline.evaluation.latent_choice import RANDOM, choose_latents
from pipeline.evaluation.probe_suite import (
    ProbeTasks,
    baseline_rows,
    build_tasks,
    f1_by_k,
    probe_residual,
    probe_variant,
)
from pipeline.evaluation.probing import DEFAULT_KS
from pipeline.evaluation.run_metrics import PassResult, Variant, stream_pass, union_layers
from pipeline.evaluation.splice import (
    SpliceResult,
    eval_windows,
    load_store_model,
    splice_scores,
)
from pipeline.evaluation.top_contexts import TokenView, store_decode
from pipeline.harvest.models import resolve_device
from pipeline.paths import (
    EvaluationPaths,
    ReportPaths,
    RunPaths,
    default_reports_root,
    report_dir,
)
from pipeline.store.catalog import find_store
from pipeline.store.outliers import outlier_scan
from pipeline.store.reader import ActivationStore, StoreError
from pipeline.training.checkpoint import load_coder, read_coder_json
from pipeline.training.loader import ActivationLoader, Normaliser
from pipeline.training.manifest import CoderManifest, load_coder_manifest, recorded_manifest
from stages.train import open_cache, run_paths, store_layers


@dataclass(frozen=True)
class EvaluateOptions:
    judge: str = "purity"  # purity | openai | transformers
    judge_fallback: bool = False  # a failing judge: purity proxy (labelled) instead of an error
    latents_sampled: int = 24  # latents judged and given a page, per variant
    latents_top: int = 8  # and pages for the top latents by coherence and by probe weight
    max_tokens: int | None = None  # cap on held-out tokens (the first, in store order)
    splice: bool = True  # spliced-in CE/KL (loads the model)
    splice_off_by: str = "--no-splice"  # what turned the splice off, for the report
    splice_windows: int = 8  # context windows scored (1 + 2L forwards each: CPU-heavy)
    masking_tokens: int = 8192  # tokens for the single-layer masking test (L + 1 encodes)
    ks: tuple[int, ...] = DEFAULT_KS
    n_top: int = 20  # top contexts kept per latent
    judge_contexts: int = 10  # of those, shown to the judge
    batch_size: int = 1024
    bootstrap: int = bootstrap.N_BOOT  # resamples of held-out documents (0: no intervals)
    seed: int = 0
    device: str = "auto"
    cache_root: Path | None = None  # default: the one each run's manifest names
    # run id -> protocol record (variant, role, seed, lr), as `pipeline run` labels its runs:
    # the report folds seeds by them. None: each run is a variant of its own.
    labels: dict[str, dict] | None = None
    progress: bool = True


def resolve_checkpoint(target: Path) -> Path:
    """A run directory, a checkpoint directory or a coder manifest -> a checkpoint dir."""
    target = Path(target)
    if target.is_file():
        manifest, base = load_coder_manifest(target)
        final = run_paths(manifest, open_cache(manifest, base).key).final
        if not final.is_dir():
            raise FileNotFoundError(f"{target}: not trained yet: run `pipeline train {target}`")
        return final
    if (target / "coder.json").is_file():
        return target
    if RunPaths(target).final.is_dir():
        return RunPaths(target).final
    raise FileNotFoundError(f"{target}: neither a run directory, a checkpoint nor a manifest")


def _run_record(checkpoint: Path) -> tuple[str, CoderManifest, int]:
    """Cache key, coder manifest and step of a checkpoint (from its run's record)."""
    record_path = RunPaths(checkpoint.parent).manifest
    extra = read_coder_json(checkpoint).get("extra", {})
    record = json.loads(record_path.read_text()) if record_path.is_file() else extra
    if "manifest" not in record or "cache_key" not in record:
        raise ValueError(f"{checkpoint}: no run record ({record_path.name}) names its cache")
    return (
        record["cache_key"],
        recorded_manifest(record["manifest"]),
        extra.get("step", 0),
    )


def expected_provenance(targets: list[Path], options: EvaluateOptions) -> dict:
    """What an evaluation of ``targets`` with ``options`` would record as its provenance
    (``results.provenance``), computed without evaluating: to decide whether to reuse."""
    checkpoints = [resolve_checkpoint(t) for t in targets]
    keys = sorted({_run_record(c)[0] for c in checkpoints})
    weights = {tables.run_id(c.parent): tables.weights_checksums(c) for c in checkpoints}
    code = tables.code_version((Path(__file__).resolve(),))
    return tables.provenance(",".join(keys), weights, vars(options), code)


def load_variants(
    targets: list[Path], options: EvaluateOptions, device: torch.device
) -> tuple[ActivationStore, list[Variant]]:
    stores: dict[str, ActivationStore] = {}
    variants = []
    for target in targets:
        checkpoint = resolve_checkpoint(target)
        key, manifest, step = _run_record(checkpoint)
        if key not in stores:
            root = options.cache_root or (
                Path(manifest.cache.root) if manifest.cache.root else None
            )
            stores[key] = find_store(key, root)
        store = stores[key]
        layers = store_layers(manifest, store)
        coder = load_coder(checkpoint, device)
        ratio = manifest.training.outlier_norm_ratio
        outliers = outlier_scan(store, ratio)
        normaliser = Normaliser.from_store(store, layers, manifest.training.centre, outliers)
        normaliser = normaliser.to(device)
        variants.append(
            Variant(
                manifest.name,
                "",
                checkpoint.parent,
                coder,
                layers,
                normaliser,
                step,
                coder.config.kind,
                outlier_ratio=ratio,
            )
        )
    ratios = {v.outlier_ratio for v in variants}
    if len(ratios) > 1:
        raise ValueError(
            "training.outlier_norm_ratio: runs differ "
            f"({', '.join(map(str, sorted(ratios, key=str)))}): they would be tested on "
            "different tokens; evaluate them separately"
        )
    if len(stores) != 1:
        raise StoreError(
            f"runs come from different caches ({', '.join(stores)}): evaluate "
            "each cache's runs separately"
        )
    names = [v.name for v in variants]
    for v in variants:  # duplicate names (one manifest, two runs): add the run hash
        if names.count(v.name) > 1:
            v.name = f"{v.name}-{v.run_dir.name[:6]}"
        v.slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", v.name)
    return next(iter(stores.values())), variants


def outlier_record(store: ActivationStore, ratio: float | None) -> dict:
    """What the massive-activation rule removed from every split (pipeline.store.outliers)."""
    scan = outlier_scan(store, ratio)
    if scan is None:
        return {"ratio": None, "excluded_tokens": 0}
    return {
        "ratio": ratio,
        "excluded_tokens": int(scan.rows.size),
        "energy_share": [round(float(v), 4) for v in scan.energy_share],
    }


def default_out_dir(store: ActivationStore, variants: list[Variant], options) -> Path:
    material = json.dumps([sorted(str(v.run_dir) for v in variants), options.max_tokens])
    return report_dir(
        default_reports_root(), store.key, hashlib.sha256(material.encode()).hexdigest()[:10]
    )


@dataclass
class _Measured:
    """Everything measured before writing: the pass, probes, latents and splice."""

    passed: PassResult
    tasks: ProbeTasks
    probe_rows: list[dict]
    purity: dict[str, tuple[np.ndarray, np.ndarray]]
    details: dict[str, list[ld.LatentDetail]]
    splices: dict[str, SpliceResult]
    judged: dict[str, str]  # who rated each variant: the judge, or the labelled fallback
    intervals: dict[str, dict]  # per variant: the bootstrap record (empty when off)


def _measure(store, variants, union, hooks_of, options, backend) -> _Measured:
    loader = ActivationLoader(
        store,
        batch_size=options.batch_size,
        layers=union,
        split="test",
        mode="stream",
        device=variants[0].scale.device,
        outlier_ratio=variants[0].outlier_ratio,
    )
    eval_rows = loader.rows[: options.max_tokens]
    tokens, documents = store.tokens(), store.documents()
    tasks = build_tasks(tokens, documents, eval_rows, build_gazetteer(), options.seed)
    doc_of_row = tokens["doc_id"].to_numpy().astype(np.int64)
    doc_index = bootstrap.DocumentIndex.of_rows(doc_of_row, eval_rows)
    with torch.no_grad():
        passed = stream_pass(
            loader,
            variants,
            tasks.rows(),
            max_tokens=options.max_tokens,
            batch_size=options.batch_size,
            n_top=options.n_top,
            masking_tokens=options.masking_tokens,
            progress=options.progress,
            documents=doc_index if options.bootstrap else None,
        )
    loader.close()
    probe_rows = probe_residual(passed.residual, tasks, options.ks, options.seed)
    for res in tqdm(passed.variants, desc="probe", unit="variant", disable=not options.progress):
        probe_rows += probe_variant(
            res, tasks, hooks_of[res.variant.name], options.ks, options.seed
        )

    labelings = ld.row_labelings(tokens, documents, tasks.concepts)
    purity, chosen = {}, {}
    for r in passed.variants:
        purity[r.variant.name] = ld.purity(r.top_rows, labelings, passed.eval_rows, doc_of_row)
        chosen[r.variant.name] = choose_latents(
            r,
            purity[r.variant.name][0],
            tasks,
            options.latents_sampled,
            options.latents_top,
            options.seed,
        )
    model_spec = store.manifest["manifest"]["model"]
    view = TokenView.from_table(tokens, lambda: store_decode(model_spec))
    device = variants[0].scale.device
    details = ld.sampled_details(
        store, view, union, passed.variants, chosen, device, passed.eval_rows, options.seed
    )
    planted = model_spec["source"] == "planted"  # synthetic activations: no model to splice
    model = load_store_model(store, device) if options.splice and not planted else None
    splices = {}
    if model is not None:
        ctx = store.manifest["manifest"]["tokenization"]["context_length"]
        windows = eval_windows(tokens, passed.eval_rows, ctx, options.splice_windows)
        union_hooks = [store.hook_names[layer] for layer in union]
        splices = splice_scores(model, variants, union_hooks, windows, progress=options.progress)
    judged = {res.variant.name: options.judge for res in passed.variants}
    for res in passed.variants:
        name = res.variant.name
        for d in details[name]:
            d.purity, d.purity_class = float(purity[name][0][d.latent]), purity[name][1][d.latent]
        failed = ld.rate(details[name], backend, options.judge_contexts, options.judge_fallback)
        if failed is not None:
            judged[name] = f"purity (fallback: {options.judge} judge failed: {failed})"
        if model is not None:
            ld.logit_effects(details[name], res, ld.unembedding(model), hooks_of[name])
    intervals = _intervals(passed, tasks, doc_index, details, judged, options)
    return _Measured(passed, tasks, probe_rows, purity, details, splices, judged, intervals)


def _intervals(passed, tasks, doc_index, details, judged, options) -> dict[str, dict]:
    """Each variant's bootstrap record, on one shared set of document resamples."""
    if not options.bootstrap or passed.moments is None or doc_index.n_docs < 2:
        return {}
    counts = bootstrap.resample_counts(doc_index.n_docs, options.bootstrap, options.seed)
    out = {}
    bar = tqdm(passed.variants, desc="bootstrap", unit="variant", disable=not options.progress)
    for res in bar:
        name = res.variant.name
        sample = [d for d in details[name] if d.chosen_by == RANDOM]
        flags = tables.coherent_flags(sample, judged[name])
        out[name] = bootstrap.variant_intervals(
            res, passed.moments, counts, tasks, doc_index, flags, options.seed
        )
    return out


def _write(
    out: ReportPaths, store, variants, hooks_of, m: _Measured, options, provenance: dict
) -> None:
    summaries, combined = (
        [],
        {"per_layer": [], "latents": [], "sampled": [], "probing": m.probe_rows},
    )
    truth = recovery.planted_truth(store.manifest)
    recovered = {}
    for res in m.passed.variants:
        name = res.variant.name
        by_k = {t: f1_by_k(m.probe_rows, name, t) for t in ("token", "sequence")}
        summary = tables.summary_row(
            res,
            hooks_of[name],
            m.purity[name][0],
            [d for d in m.details[name] if d.chosen_by == RANDOM],  # the unbiased sample
            m.judged[name],
            by_k,
            m.splices.get(name),
        )
        if options.labels:
            summary["protocol"] = options.labels.get(summary["run_dir"])
        if name in m.intervals:
            summary["bootstrap"] = m.intervals[name]
        if truth is not None:
            recovered[name] = recovery.evaluate_variant(res, *truth)
            summary.update(recovered[name]["columns"])
        own = {
            "per_layer": tables.per_layer_rows(res, hooks_of[name], m.splices.get(name)),
            "latents": tables.latent_rows(res, *m.purity[name]),
            "probing": [r for r in m.probe_rows if r["features"].split(" @ ")[0] == name],
        }
        run_paths = EvaluationPaths(RunPaths(res.variant.run_dir).evaluation)
        own_weights = {summary["run_dir"]: provenance["weights"][summary["run_dir"]]}
        # where the side-by-side report is: in the run's own file only, so that results.json
        # names no path and reads the same from every data directory
        traced = {**summary, "report": str(out.root)}
        traced["provenance"] = {**provenance, "weights": own_weights}
        tables.write_variant(run_paths, traced, own)
        summaries.append(summary)
        combined["per_layer"] += own["per_layer"]
        combined["latents"] += own["latents"]
        combined["sampled"] += tables.sampled_rows(
            [d for d in m.details[name] if d.chosen_by == RANDOM]
        )
        if truth is not None:
            combined.setdefault("recovery", []).extend(recovered[name]["rows"])
        if res.trajectories is not None:
            rows = trajectories.quantile_rows(name, res.trajectories, res.sparsity.alive)
            combined.setdefault("trajectories", []).extend(rows)
    baselines = baseline_rows(m.probe_rows, variants)
    combined["variants"] = summaries + [
        {k: v for k, v in b.items() if k != "features"} for b in baselines
    ]
    meta = {
        "store": store.key,
        "model": store.manifest["manifest"]["model"],
        "options": tables.recorded_options(vars(options)),
        "provenance": provenance,
        "n_eval_tokens": int(m.passed.eval_rows.size),
        "outliers": outlier_record(store, variants[0].outlier_ratio),
        "probe_tasks": {
            "token": sorted(m.tasks.token),
            "sequence": sorted(m.tasks.sequence),
            "dropped": m.tasks.dropped,
        },
        "splice": "done"
        if m.splices
        else "skipped (a planted cache has no model)"
        if store.manifest["manifest"]["model"]["source"] == "planted"
        else f"skipped ({options.splice_off_by})",
    }
    if truth is not None:
        meta["recovery"] = {
            name: {"summary": r["summary"], "calibration": r["calibration"]}
            for name, r in recovered.items()
        }
    tables.write_report_tables(
        out, {"variants": summaries, "baselines": baselines, **meta}, combined
    )
    plots = report.write_plots(
        out, m.passed.variants, hooks_of, m.probe_rows, baselines, m.splices, summaries
    )
    slugs = {v.name: v.slug for v in variants}
    html_report.write(out, summaries, baselines, meta, plots, m.details, hooks_of, slugs)


def run(targets: list[Path], out_dir: Path | None, options: EvaluateOptions) -> Path:
    """Evaluate every run side by side; returns the report directory."""
    backend = ld.judge_backend(options.judge)  # fail on a misconfigured judge before the work
    provenance = expected_provenance(targets, options)  # before: weights must not change under us
    device = resolve_device(options.device)
    store, variants = load_variants(targets, options, device)
    union = union_layers(variants)
    hooks_of = {v.name: [store.hook_names[layer] for layer in v.layers] for v in variants}
    measured = _measure(store, variants, union, hooks_of, options, backend)
    out = ReportPaths(Path(out_dir) if out_dir else default_out_dir(store, variants, options))
    _write(out, store, variants, hooks_of, measured, options, provenance)
    return out.root
