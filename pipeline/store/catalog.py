"""Finding stores under a cache root, for ``pipeline ls`` / ``show`` and for training."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.paths import StorePaths, default_cache_root, incomplete_store_dir, store_dir
from pipeline.store.record import StoreError, StoreRecord, tree_bytes

if TYPE_CHECKING:
    from pipeline.store.reader import ActivationStore

# `pipeline ls`, `runs` and `show` read JSON, small files and file sizes only: the reader
# (and with it torch and zarr) is imported by find_store alone, so they answer at once.


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
    size = tree_bytes(root)
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
        if entry.name.endswith(".damaged"):  # stages/harvest.py, while it is replaced
            rows.append(_summary(entry, entry.name.removesuffix(".damaged"), "damaged"))
        elif entry.name.endswith(".incomplete"):
            rows.append(_summary(entry, entry.name.removesuffix(".incomplete"), "incomplete"))
        else:
            rows.append(_summary(entry, entry.name, "complete"))
    return rows


def find_store(key: str, cache_root: Path | None = None, verify: bool = False) -> ActivationStore:
    """Open a finished store by key (a unique prefix is enough)."""
    from pipeline.store.reader import ActivationStore

    return ActivationStore(finished_store_dir(key, cache_root), verify=verify)


def find_record(key: str, cache_root: Path | None = None) -> StoreRecord:
    """A finished store's checked record, manifest and statistics by key, without opening
    its arrays (torch-free: ``pipeline show``)."""
    return StoreRecord(finished_store_dir(key, cache_root))


def finished_store_dir(key: str, cache_root: Path | None = None) -> Path:
    """The directory of the finished store ``key`` names (a unique prefix is enough); a
    missing, ambiguous, incomplete or unsealed one is a one-line ``StoreError``."""
    root = Path(cache_root) if cache_root else default_cache_root()
    candidates = [p for p in root.glob(f"{key}*") if p.is_dir()] if root.is_dir() else []
    finished = [p for p in candidates if not p.name.endswith((".incomplete", ".damaged"))]
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
    found = store_dir(root, finished[0].name)
    if not StorePaths(found).completion.is_file():
        raise StoreError(f"{found}: {_no_completion_remedy(found)}")
    return found


def _no_completion_remedy(store: Path) -> str:
    """What to do with a finished store that lost ``complete.json``: harvest it again
    (stages/harvest.py replaces the damaged directory), naming the manifest if recorded."""
    try:
        source = json.loads(StorePaths(store).manifest.read_text(encoding="utf-8"))["source"]
    except (OSError, ValueError, KeyError, TypeError):
        source = ""
    command = f"pipeline harvest {source}" if source else "pipeline harvest <its manifest>"
    return (
        "not a finished store (complete.json is missing: deleted or damaged); re-harvest "
        f"it with `{command}`, which replaces this directory"
    )


# --------------------------------------------------------------------------- runs

RUN_NAME_FILE = "name"  # runs/<cache key>/<run hash>/name: the manifests' names, one a line
RUNNING_WITHIN_S = 300.0  # a run whose metric log moved this recently counts as running
SUMMARY_FILE = "summary.json"  # final/summary.json: the last logged figures, under checksums
CHECKSUMS_FILE = "checksums.json"  # final/ and checkpoints: size + SHA-256 of every file
CHECKSUMS_FORMAT = "fmxcoders-checkpoint/1"


@dataclass(frozen=True)
class RunSummary:
    name: str
    cache: str
    run_hash: str
    kind: str
    steps: int
    total_steps: int
    fvu: float  # complete: final/summary.json (checksummed); else the last log line's
    l0: float
    state: str  # complete | untrained | running | incomplete | broken (file: reason)
    path: Path
    names: tuple[str, ...] = ()  # every manifest name trained into this run (same settings)


def write_run_name(run_root: Path, name: str) -> None:
    """Record the human name beside the hash, so ``ls runs/<key>/*/name`` finds a run.

    Two manifests with different names but the same settings train one run; each name is
    kept (one a line) so neither is silently dropped and both find the run."""
    target = Path(run_root) / RUN_NAME_FILE
    names = read_run_names(target) if target.is_file() else []
    if name not in names:
        target.write_text("".join(f"{n}\n" for n in [*names, name]), encoding="utf-8")


def read_run_names(path: Path) -> list[str]:
    """The names in a run's ``name`` file (UnicodeDecodeError / OSError pass through)."""
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    """SHA-256 of a file, read in blocks (torch-free: ``pipeline runs`` checks with it)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def sealed_dir_problem(directory: Path, required: tuple[str, ...]) -> str | None:
    """Why ``directory`` does not match its ``checksums.json`` (``"<file>: reason"``), or
    None when every listed file, ``required`` among them, has its size and SHA-256.

    Torch-free, so ``pipeline runs`` can check a run's ``final/`` without loading torch;
    ``pipeline.training.checkpoint.verify_checkpoint`` raises on the same answer."""
    directory = Path(directory)
    listing = directory / CHECKSUMS_FILE
    if not directory.is_dir():
        return f"{directory}: no such checkpoint directory"
    if not listing.is_file():
        return f"{listing}: missing (the checkpoint was never completed)"
    try:
        doc = json.loads(listing.read_text(encoding="utf-8"))
        files = doc["files"]
        if doc.get("format") != CHECKSUMS_FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {doc.get('format')!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{listing}: unreadable ({err})"
    for name in required:
        if name not in files:
            return f"{listing}: does not list {name}"
    for name, expected in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            return f"{path}: missing"
        if path.stat().st_size != expected["size"]:
            return f"{path}: {path.stat().st_size} bytes, expected {expected['size']} (truncated?)"
        if sha256_file(path) != expected["sha256"]:
            return f"{path}: checksum mismatch (the file changed after saving)"
    return None


def _last_log(metrics: Path) -> dict:
    if not metrics.is_file():
        return {}
    lines = metrics.read_text(encoding="utf-8").strip().splitlines()
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            return row
    return {}


def _number(row: dict, key: str) -> float:
    value = row.get(key)
    return float(value) if isinstance(value, int | float) else float("nan")


def _legacy_final_verifies(final: Path) -> bool:
    """A ``final/`` saved before checksums.json: its weights match coder.json's SHA-256."""
    if (final / CHECKSUMS_FILE).exists() or not (final / "coder.safetensors").is_file():
        return False
    coder = json.loads((final / "coder.json").read_text(encoding="utf-8"))
    return sha256_file(final / "coder.safetensors") == coder.get("weights_sha256")


def _final_state(paths) -> tuple[str, dict]:
    """``complete`` (or ``untrained``) with the verified summary, or ``broken (...)``."""
    problem = sealed_dir_problem(paths.final, ("coder.json", "coder.safetensors"))
    if problem is not None and _legacy_final_verifies(paths.final):
        return "complete (legacy: no checksums.json, no figures)", {}
    if problem is None:
        summary_file = paths.final / SUMMARY_FILE
        coder = json.loads((paths.final / "coder.json").read_text(encoding="utf-8"))
        summary = (
            json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else {}
        )
        summary.setdefault("step", coder.get("extra", {}).get("step", 0))
        return ("untrained" if summary["step"] == 0 else "complete"), summary
    return f"broken ({problem.replace(str(paths.root) + '/', '')})", {}


def _run_summary(run: Path) -> RunSummary:
    """One run's row; any file it cannot read makes the run ``broken (file: reason)``."""
    from pipeline.paths import RunPaths

    paths = RunPaths(run)
    names: list[str] = []
    kind, total, log, current = "?", 0, {}, run / RUN_NAME_FILE
    try:
        if current.is_file():
            names = read_run_names(current)
        current = paths.manifest
        record = json.loads(paths.manifest.read_text(encoding="utf-8"))
        manifest, coder = record["manifest"], record["coder"]
        names = names or [str(manifest.get("name", "?"))]
        kind = str(coder.get("kind", "?"))
        training = manifest.get("training", {})
        total = -(-int(training.get("tokens", 0)) // int(training.get("batch_size", 1024)))
        if paths.final.is_dir():  # figures only from the checksummed final/
            current = paths.final
            state, log = _final_state(paths)
        else:
            current = paths.metrics
            log = _last_log(paths.metrics)
            recent = paths.metrics.is_file() and (
                time.time() - paths.metrics.stat().st_mtime < RUNNING_WITHIN_S
            )
            state = "running" if recent else "incomplete"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        reason = " ".join(str(err).split())
        if isinstance(err, KeyError):
            reason = f"no field {err}"
        elif isinstance(err, OSError) and err.strerror:
            reason = err.strerror.lower()
        where = current.relative_to(run) if current.is_relative_to(run) else current
        state, log = f"broken ({where}: {reason})", {}
    steps = int(log["step"]) if isinstance(log.get("step"), int) else 0
    name = ", ".join(names) or "?"
    fvu, l0 = _number(log, "fvu"), _number(log, "l0")
    return RunSummary(
        name, run.parent.name, run.name, kind, steps, total, fvu, l0, state, run, tuple(names)
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
    by_name = [r for r in runs if query in r.names]
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
