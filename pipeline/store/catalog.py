"""Finding stores under a cache root, for ``pipeline ls`` / ``show`` and for training."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.paths import StorePaths, default_cache_root, incomplete_store_dir, store_dir

if TYPE_CHECKING:
    from pipeline.store.reader import ActivationStore

# `pipeline ls` and `pipeline runs` read JSON and file sizes only: the reader (and with it
# torch) is imported by the functions that open a store, so they answer at once.


@dataclass(frozen=True)
class StoreSummary:
    key: str
    status: str  # complete | incomplete
    tokens: int
    layers: int
    size_mb: float
    model: str


def _describe_model(manifest: dict) -> str:
    model = manifest.get("manifest", {}).get("model", {})
    if model.get("source") == "random":
        return f"random {model['n_layers']}x{model['d_model']} (seed {model['seed']})"
    return model.get("path") or model.get("name") or "?"


def _summary(root: Path, key: str, status: str) -> StoreSummary:
    paths = StorePaths(root)
    manifest = json.loads(paths.manifest.read_text()) if paths.manifest.is_file() else {}
    tokens = manifest.get("manifest", {}).get("tokenization", {}).get("num_tokens", 0)
    layers = 0
    if paths.completion.is_file():
        layers = len(json.loads(paths.completion.read_text())["hooks"])
    elif paths.activations.is_dir():
        layers = sum(1 for p in paths.activations.iterdir() if p.is_dir())
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())  # no torch import
    return StoreSummary(key, status, tokens, layers, size / 1e6, _describe_model(manifest))


RANDOM_ONLY = ("n_layers", "d_model", "seed")  # model fields only a random model reads


def shown_manifest(record: dict) -> dict:
    """A store's harvest manifest as ``pipeline show`` prints it: a real model's section
    without the random model's size fields (their defaults, 4 x 64, said nothing true)."""
    manifest = json.loads(json.dumps(record.get("manifest", {})))
    model = manifest.get("model", {})
    if model.get("source") != "random":
        for name in RANDOM_ONLY:
            model.pop(name, None)
    return manifest


def model_facts(record: dict) -> str:
    """One line: the model as harvested (identity, layers, width, compute dtype)."""
    material = record.get("key_material", {}).get("model", {})
    identity = material.get("identity", {})
    label = _describe_model(record)
    if isinstance(identity, dict) and identity.get("package"):
        label += f" ({identity['package']})"
    layers = record.get("model_n_layers", "?")
    storage = record.get("key_material", {}).get("storage_dtype", "?")
    return (
        f"model {label}: {layers} layers, d_model {record.get('d_model', '?')}, computed in "
        f"{material.get('dtype', '?')}, stored as {storage}"
    )


def list_stores(cache_root: Path | None = None) -> list[StoreSummary]:
    root = Path(cache_root) if cache_root else default_cache_root()
    if not root.is_dir():
        return []
    rows = []
    for entry in sorted(root.iterdir()):
        if not entry.is_dir():
            continue
        if entry.name.endswith(".incomplete"):
            rows.append(_summary(entry, entry.name.removesuffix(".incomplete"), "incomplete"))
        else:
            rows.append(_summary(entry, entry.name, "complete"))
    return rows


def find_store(key: str, cache_root: Path | None = None, verify: bool = False) -> ActivationStore:
    """Open a finished store by key (a unique prefix is enough)."""
    from pipeline.store.reader import ActivationStore, StoreError

    root = Path(cache_root) if cache_root else default_cache_root()
    candidates = [p for p in root.glob(f"{key}*") if p.is_dir()] if root.is_dir() else []
    finished = [p for p in candidates if not p.name.endswith(".incomplete")]
    if len(finished) > 1:
        raise StoreError(f"cache key prefix '{key}' is ambiguous under {root}")
    if not finished:
        if incomplete_store_dir(root, key).is_dir() or any(
            p.name.endswith(".incomplete") for p in candidates
        ):
            raise StoreError(
                f"cache {key} under {root} is incomplete: run `pipeline harvest` on its "
                "manifest again to finish it"
            )
        raise StoreError(f"no cache {key} under {root} (see `pipeline ls`)")
    return ActivationStore(store_dir(root, finished[0].name), verify=verify)


# --------------------------------------------------------------------------- runs

RUN_NAME_FILE = "name"  # runs/<cache key>/<run hash>/name: the manifest's name, one line
RUNNING_WITHIN_S = 300.0  # a run whose metric log moved this recently counts as running


@dataclass(frozen=True)
class RunSummary:
    name: str
    cache: str
    run_hash: str
    kind: str
    steps: int
    total_steps: int
    fvu: float  # the evaluation's if evaluated, else the last training log line's
    l0: float
    state: str  # complete | running | incomplete | broken
    path: Path


def write_run_name(run_root: Path, name: str) -> None:
    """Record the human name beside the hash, so ``ls runs/<key>/*/name`` finds a run."""
    target = Path(run_root) / RUN_NAME_FILE
    if not target.is_file() or target.read_text(encoding="utf-8").strip() != name:
        target.write_text(name + "\n", encoding="utf-8")


def _last_log(metrics: Path) -> dict:
    if not metrics.is_file():
        return {}
    lines = metrics.read_text(encoding="utf-8").strip().splitlines()
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return {}


def _run_summary(run: Path) -> RunSummary:
    import time

    from pipeline.paths import EvaluationPaths, RunPaths

    paths = RunPaths(run)
    name_file = run / RUN_NAME_FILE
    try:
        record = json.loads(paths.manifest.read_text(encoding="utf-8"))
        manifest, coder = record["manifest"], record["coder"]
    except (OSError, ValueError, KeyError):
        manifest, coder = {}, {}
    name = (
        name_file.read_text(encoding="utf-8").strip()
        if name_file.is_file()
        else manifest.get("name", "?")
    )
    training = manifest.get("training", {})
    batch = int(training.get("batch_size", 1024))
    total = -(-int(training.get("tokens", 0)) // batch) if training else 0
    log = _last_log(paths.metrics)
    fvu, l0 = float(log.get("fvu", float("nan"))), float(log.get("l0", float("nan")))
    evaluation = EvaluationPaths(paths.evaluation).metrics
    if evaluation.is_file():
        try:
            summary = json.loads(evaluation.read_text(encoding="utf-8"))
            fvu, l0 = float(summary.get("fvu", fvu)), float(summary.get("l0", l0))
        except (ValueError, TypeError):
            pass
    steps = int(log.get("step", 0))
    final = paths.final / "coder.json"
    if not manifest:
        state = "broken"
    elif final.is_file():
        try:
            steps = int(json.loads(final.read_text(encoding="utf-8"))["extra"]["step"])
            state = "complete" if (paths.final / "coder.safetensors").is_file() else "broken"
        except (ValueError, KeyError, TypeError):
            state = "broken"
    elif paths.metrics.is_file() and time.time() - paths.metrics.stat().st_mtime < RUNNING_WITHIN_S:
        state = "running"
    else:
        state = "incomplete"
    return RunSummary(
        name,
        run.parent.name,
        run.name,
        str(coder.get("kind", "?")),
        steps,
        total,
        fvu,
        l0,
        state,
        run,
    )


def list_runs(runs_root: Path | None = None) -> list[RunSummary]:
    """Every run directory under ``runs_root`` (``runs/<cache key>/<run hash>/``)."""
    from pipeline.paths import default_runs_root

    root = Path(runs_root) if runs_root else default_runs_root()
    if not root.is_dir():
        return []
    runs = [
        r for cache in sorted(root.iterdir()) if cache.is_dir() for r in sorted(cache.iterdir())
    ]
    return [_run_summary(r) for r in runs if r.is_dir()]


def find_run(query: str, runs_root: Path | None = None) -> Path:
    """A run directory by path, name, or unique prefix of its hash (or ``<cache>/<hash>``)."""
    candidate = Path(query).expanduser()
    if candidate.is_dir():
        return candidate
    runs = list_runs(runs_root)
    by_name = [r for r in runs if r.name == query]
    by_hash = [
        r for r in runs if r.run_hash.startswith(query) or f"{r.cache}/{r.run_hash}" == query
    ]
    matches = by_name or by_hash
    if len(matches) == 1:
        return matches[0].path
    if not matches:
        raise FileNotFoundError(f"no run named or hashed {query!r} (see `pipeline runs`)")
    listed = ", ".join(f"{m.cache}/{m.run_hash}" for m in matches[:5])
    raise ValueError(f"run {query!r} is ambiguous: {listed}; give a longer hash prefix")
