"""Fault injection: every file of a store and of a run, damaged three ways; killed training
runs; bad manifest values. Each case ends in a one-line error naming the file or field, or
in a recovery to the same bytes an undisturbed run writes, and leaves what was already
stored unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.coders import build_coder, coder_config_from_dict
from pipeline.experiment.manifest import load_experiment
from pipeline.manifests.io import ManifestError
from pipeline.paths import RunPaths, StorePaths
from pipeline.store.locks import LockedError, exclusive_lock
from pipeline.store.reader import ActivationStore, StoreError
from pipeline.training.checkpoint import save_coder
from pipeline.training.manifest import CoderManifest
from stages import train
from tests.helpers import harvest_real_small, harvest_tiny

HOOK = "blocks.1.hook_resid_post"


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


def flip(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def delete(path: Path) -> None:
    path.unlink()


DAMAGE: dict[str, Callable[[Path], None]] = {"flip": flip, "truncate": truncate, "delete": delete}


def one_line(message: str) -> str:
    assert "\n" not in message.strip(), message
    return message


# --- stores ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    return harvest_tiny(tmp_path_factory.mktemp("cache"))


STORE_FILES = {
    "tokens": "tokens.parquet",
    "documents": "documents.parquet",
    "stats": "stats.safetensors",
    "manifest": "manifest.json",
    "group-metadata": "activations.zarr/zarr.json",
    "array-metadata": f"activations.zarr/{HOOK}/zarr.json",
    "marker": "blocks/000001.safetensors",
    "chunk": f"activations.zarr/{HOOK}/c/1/0",
}


def copy_store(store: Path, tmp_path: Path) -> Path:
    target = tmp_path / "cache" / store.name
    shutil.copytree(store, target)
    return target


def store_fault(store: Path, relative: str, how: str, verify: bool) -> StoreError:
    """Damage one file; the store must refuse to open (or to verify) naming it."""
    path = store / relative
    DAMAGE[how](path)
    before = digest(store)
    with pytest.raises(StoreError) as caught:
        ActivationStore(store, verify=verify)
    message = one_line(str(caught.value))
    assert message.startswith(f"{path}: "), message
    assert "re-harvest" in message and "pipeline harvest" in message
    assert digest(store) == before, "opening a damaged store changed it"
    return caught.value


@pytest.mark.parametrize("how", sorted(DAMAGE))
@pytest.mark.parametrize("kind", sorted(STORE_FILES))
def test_damaged_store_file_is_named(tiny_store, tmp_path, kind, how):
    # a flipped bit in a marker or a chunk keeps its size: only --verify reads those
    verify = how == "flip" and kind in ("marker", "chunk")
    store_fault(copy_store(tiny_store, tmp_path), STORE_FILES[kind], how, verify)


def test_flip_in_tables_and_stats_is_caught_on_open_at_every_offset(tiny_store, tmp_path):
    """The issue's silent case: bit flips in tokens.parquet changed token ids unnoticed."""
    store = copy_store(tiny_store, tmp_path)
    for relative in ("tokens.parquet", "stats.safetensors", "documents.parquet"):
        path = store / relative
        original = path.read_bytes()
        for at in range(0, len(original), max(1, len(original) // 40)):
            flip(path, at)
            with pytest.raises(StoreError, match=f"^{path}: checksum mismatch"):
                ActivationStore(store)
            path.write_bytes(original)
    ActivationStore(store, verify=True)


@pytest.mark.parametrize("how", ["flip", "truncate", "garbage"])
def test_damaged_completion_record_is_named(tiny_store, tmp_path, how):
    store = copy_store(tiny_store, tmp_path)
    record = StorePaths(store).completion
    text = record.read_text()
    if how == "flip":  # a digit of n_tokens: still valid JSON, different meaning
        at = text.index('"n_tokens": ') + len('"n_tokens": ')
        flip(record, at)
    elif how == "truncate":
        truncate(record)
    else:
        record.write_text("not json at all")
    with pytest.raises(StoreError) as caught:
        ActivationStore(store)
    assert one_line(str(caught.value)).startswith(f"{record}: ")


def test_store_from_before_file_checksums_still_opens(tiny_store, tmp_path):
    """Older stores (no ``files`` / ``record_crc32c``) open with their chunk checks."""
    store = copy_store(tiny_store, tmp_path)
    record = StorePaths(store).completion
    data = json.loads(record.read_text())
    del data["files"], data["record_crc32c"]
    record.write_text(json.dumps(data))
    ActivationStore(store, verify=True)
    truncate(store / STORE_FILES["chunk"])
    with pytest.raises(StoreError, match="truncated"):
        ActivationStore(store)


def test_cli_show_verify_names_the_damaged_file(tiny_store, tmp_path):
    store = copy_store(tiny_store, tmp_path)
    flip(store / "tokens.parquet")
    result = CliRunner().invoke(
        main, ["show", store.name, "--verify", "--cache-root", str(store.parent)]
    )
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {store / 'tokens.parquet'}: checksum mismatch")
    assert len(result.output.splitlines()) == 1


def test_harvest_leaves_no_lock_file(tiny_store):
    assert not list(tiny_store.parent.glob("*.lock"))


# --- runs --------------------------------------------------------------------------------

CODER = {"kind": "crosscoder", "n_latents": 64, "activation": "topk", "k": 4}


def run_manifest(store: Path, **training) -> CoderManifest:
    """runs_root is relative ('runs'), so every test writes the same manifest bytes."""
    return CoderManifest.model_validate(
        {
            "name": "faults",
            "cache": {"key": store.name, "root": str(store.parent)},
            "coder": CODER,
            "training": {"tokens": 6400, "batch_size": 64, "checkpoint_every": 25} | training,
            "run": {"runs_root": "runs", "progress": False},
        }
    )


def run_dir(where: Path, store: Path) -> Path:
    manifest = run_manifest(store)
    return where / "runs" / store.name / manifest.run_hash()


def without_rates(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "tokens_per_second"} for row in rows]


@pytest.fixture(scope="module")
def reference(tiny_store, tmp_path_factory) -> Path:
    """An undisturbed run: 100 steps, checkpoints at 25/50/75 (the newest two kept)."""
    where = tmp_path_factory.mktemp("reference")
    cwd = Path.cwd()
    os.chdir(where)
    try:
        (result,) = train.run([(run_manifest(tiny_store), where)])
    finally:
        os.chdir(cwd)
    assert result.steps == 100
    root = run_dir(where, tiny_store)
    assert sorted(p.name for p in RunPaths(root).checkpoints()) == [
        "checkpoint-000000050",
        "checkpoint-000000075",
    ]
    assert not list(where.rglob("*.lock")), "train left a lock file"
    return root


def retrain(store: Path, where: Path, monkeypatch) -> train.TrainResult:
    monkeypatch.chdir(where)
    (result,) = train.run([(run_manifest(store), where)])
    return result


def assert_same_as_reference(root: Path, reference: Path) -> None:
    assert digest(RunPaths(root).final) == digest(RunPaths(reference).final), "final differs"
    assert without_rates(RunPaths(root).metrics) == without_rates(RunPaths(reference).metrics)


def copy_run(reference: Path, tmp_path: Path, store: Path) -> Path:
    root = run_dir(tmp_path, store)
    shutil.copytree(reference, root)
    shutil.rmtree(root / "tensorboard", ignore_errors=True)
    return root


CHECKPOINT_FILES = ["coder.safetensors", "coder.json", "optimizer.safetensors", "checksums.json"]


@pytest.mark.parametrize("how", sorted(DAMAGE))
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_damaged_checkpoint_is_skipped_with_a_warning(
    tiny_store, reference, tmp_path, monkeypatch, capsys, name, how
):
    """Killed after step 75's checkpoint, which is then damaged: resume from step 50."""
    root = copy_run(reference, tmp_path, tiny_store)
    shutil.rmtree(RunPaths(root).final)
    damaged = RunPaths(root).checkpoint(75) / name
    DAMAGE[how](damaged)
    store_before = digest(tiny_store)
    result = retrain(tiny_store, tmp_path, monkeypatch)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("warning: skipping checkpoint checkpoint-000000075: ")
    assert result.steps == 100 and not result.skipped
    assert_same_as_reference(root, reference)
    assert digest(tiny_store) == store_before


def test_every_checkpoint_damaged_restarts_from_zero_and_says_so(
    tiny_store, reference, tmp_path, monkeypatch, capsys
):
    root = copy_run(reference, tmp_path, tiny_store)
    shutil.rmtree(RunPaths(root).final)
    for checkpoint in RunPaths(root).checkpoints():
        flip(checkpoint / "coder.safetensors")
    retrain(tiny_store, tmp_path, monkeypatch)
    err = capsys.readouterr().err
    assert "no valid checkpoint left; training from step 0" in err
    assert_same_as_reference(root, reference)  # no stale metric rows either


FINAL_FAULTS = [
    (name, how)
    for name in ("coder.safetensors", "coder.json", "checksums.json")
    for how in sorted(DAMAGE)
] + [("", "empty")]


@pytest.mark.parametrize(("name", "how"), FINAL_FAULTS)
def test_damaged_final_is_trained_again(
    tiny_store, reference, tmp_path, monkeypatch, capsys, name, how
):
    root = copy_run(reference, tmp_path, tiny_store)
    final = RunPaths(root).final
    if how == "empty":
        shutil.rmtree(final)
        final.mkdir()
    else:
        DAMAGE[how](final / name)
    result = retrain(tiny_store, tmp_path, monkeypatch)
    assert not result.skipped, "a damaged final/ counted as trained"
    err = capsys.readouterr().err
    assert f"{final.relative_to(tmp_path)} is not a complete checkpoint" in err
    assert_same_as_reference(root, reference)


def test_intact_final_is_skipped(tiny_store, reference, tmp_path, monkeypatch):
    root = copy_run(reference, tmp_path, tiny_store)
    before = digest(root)
    assert retrain(tiny_store, tmp_path, monkeypatch).skipped
    assert digest(root) == before


def test_same_tensors_give_identical_files(tmp_path):
    config = coder_config_from_dict({**CODER, "n_layers": 2, "d_model": 16})
    torch.manual_seed(0)
    coder = build_coder(config)
    save_coder(tmp_path / "a", coder, {"z": 1, "a": 2})
    save_coder(tmp_path / "b", coder, {"a": 2, "z": 1})
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


# Deterministic kill points (pipeline/training/checkpoint.py: fault_point): the run signals
# itself exactly there, so no test polls the disk for a race it may lose.
KILL_POINTS = {
    "first-checkpoint": "config@checkpoint-000000025",  # weights + coder.json, unsealed
    "mid-checkpoint": "weights@checkpoint-000000050",  # weights only
    "last-checkpoint": "sealed@checkpoint-000000075",  # sealed, older one not yet removed
    "writing-final": "started@final",  # final/ created, empty
}


def train_in_subprocess(
    tmp_path: Path, store: Path, fault: str, signal_name: str = "SIGKILL"
) -> subprocess.CompletedProcess:
    """``pipeline train`` in a child process that signals itself at ``fault``."""
    manifest_file = tmp_path / "manifest.json"
    manifest_file.write_text(run_manifest(store).model_dump_json())
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).parents[1]),
        "FMX_FAULT_AT": fault,
        "FMX_FAULT_SIGNAL": signal_name,
    }
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", str(manifest_file)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_killed_training_resumes_to_identical_files(
    tiny_store, reference, tmp_path, monkeypatch, point
):
    root = run_dir(tmp_path, tiny_store)
    killed = train_in_subprocess(tmp_path, tiny_store, KILL_POINTS[point])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert RunPaths(root).lock.exists(), "killed while holding the run lock"
    assert not (RunPaths(root).final / "checksums.json").exists()
    result = retrain(tiny_store, tmp_path, monkeypatch)
    assert result.steps == 100
    assert_same_as_reference(root, reference)
    assert not RunPaths(root).lock.exists(), "lock file left behind"


def test_second_train_of_the_same_run_is_refused(tiny_store, tmp_path, monkeypatch):
    root = run_dir(tmp_path, tiny_store)
    with exclusive_lock(RunPaths(root).lock, what="test"):
        monkeypatch.chdir(tmp_path)
        with pytest.raises(LockedError) as caught:
            train.run([(run_manifest(tiny_store), tmp_path)])
        message = one_line(str(caught.value))
        lock = RunPaths(root).lock.relative_to(tmp_path)  # runs_root is relative
        assert message.startswith(f"{lock}: locked by process {os.getpid()}")
        assert not RunPaths(root).metrics.exists(), "the refused run wrote metrics"


def test_chunk_crc_error_during_training_names_the_file(tiny_store, tmp_path, monkeypatch):
    store = copy_store(tiny_store, tmp_path)
    chunk = store / f"activations.zarr/{HOOK}/c/1/0"
    flip(chunk)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError) as caught:
        train.run([(run_manifest(store, tokens=2048), tmp_path)])
    assert one_line(str(caught.value)).startswith(f"{chunk}: unreadable chunk")


# --- manifests ---------------------------------------------------------------------------


def write_coder_yaml(tmp_path: Path, store: Path, text: str) -> Path:
    path = tmp_path / "coder.yaml"
    path.write_text(
        f"name: bad\ncache: {{key: {store.name}, root: {store.parent}}}\n"
        f"coder: {{kind: crosscoder, n_latents: 64, activation: topk, k: 4}}\n{text}"
    )
    return path


def cli_error(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: "), result.output
    assert len(result.output.splitlines()) == 1, result.output
    assert "Traceback" not in result.output
    return result.output


CODER_CASES = {
    "layers-negative": ("layers: [-1, 2]\n", "'layers'"),
    "layers-duplicate": ("layers: [1, 1]\n", "'layers'"),
    "layers-unsorted": ("layers: [3, 1]\n", "'layers'"),
    "layers-out-of-range": ("layers: [0, 9]\n", "'layers'"),
    "string-number": ("training: {tokens: '6400'}\n", "'training.tokens'"),
    "float-batch": ("training: {batch_size: 1.0e6}\n", "'training.batch_size'"),
    "batch-over-split": ("training: {batch_size: 1000000}\n", "'training.batch_size'"),
    "string-bool": ("training: {centre: 'no'}\n", "'training.centre'"),
    "unknown-device": ("run: {device: tpu}\n", "'run.device'"),
    "runs-root-file": ("run: {runs_root: FILE}\n", "'run.runs_root'"),
    "coder-field": ("coder: {kind: crosscoder, n_latents: -3}\n", "n_latents'"),
    "coder-string-number": ("coder: {kind: crosscoder, n_latents: 8, k: '6'}\n", "k must be an"),
    "yaml-syntax": ("training: [\n", "not valid yaml"),
}


@pytest.mark.parametrize("case", sorted(CODER_CASES))
def test_bad_coder_manifest_value_is_one_line(tiny_store, tmp_path, monkeypatch, case):
    text, field = CODER_CASES[case]
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    if case.startswith("coder-"):  # replaces the default coder section
        path = tmp_path / "coder.yaml"
        path.write_text(
            f"name: bad\ncache: {{key: {tiny_store.name}, root: {tiny_store.parent}}}\n{text}"
        )
    else:
        path = write_coder_yaml(tmp_path, tiny_store, text.replace("FILE", str(blocker)))
    monkeypatch.chdir(tmp_path)
    output = cli_error(["train", str(path)])
    assert field in output
    assert not (tmp_path / "runs").exists(), "work started before the manifest was checked"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(tiny_store, tmp_path, monkeypatch):
    path = write_coder_yaml(tmp_path, tiny_store, "run: {device: cuda}\n")
    monkeypatch.chdir(tmp_path)
    output = cli_error(["train", str(path)])
    assert "field 'run.device'" in output and "CUDA is not available" in output
    harvest = tmp_path / "h.yaml"
    harvest.write_text("model: {source: random}\nrun: {device: cuda}\n")
    assert "field 'run.device'" in cli_error(["harvest", str(harvest)])


HARVEST_CASES = {
    "string-number": ("tokenization: {context_length: '64'}\n", "'tokenization.context_length'"),
    "float-number": ("run: {batch_size: 1.0e6}\n", "'run.batch_size'"),
    "hooks-unsorted": ("hooks: {layers: [3, 1]}\n", "'hooks.layers'"),
    "cache-root-file": ("run: {cache_root: FILE}\n", "'run.cache_root'"),
    "yaml-syntax": ("model: {source: random\n", "not valid yaml"),
}


@pytest.mark.parametrize("case", sorted(HARVEST_CASES))
def test_bad_harvest_manifest_value_is_one_line(tmp_path, case):
    text, field = HARVEST_CASES[case]
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = tmp_path / "h.yaml"
    path.write_text("model: {source: random}\n" + text.replace("FILE", str(blocker)))
    root = [] if case == "cache-root-file" else ["--cache-root", str(tmp_path / "cache")]
    output = cli_error(["harvest", str(path), *root])
    assert field in output
    assert not (tmp_path / "cache").exists()


def test_cache_root_option_pointing_at_a_file(tmp_path):
    path = tmp_path / "h.yaml"
    path.write_text("model: {source: random}\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    output = cli_error(["harvest", str(path), "--cache-root", str(blocker / "cache")])
    assert output.startswith(f"Error: --cache-root: {blocker} is not a directory")


EXPERIMENT_CASES = {
    "judge": ("evaluation: {judge: nonsense}\n", "'evaluation.judge'"),
    "variant-coder": (
        "variants:\n  - {name: a, coder: {kind: crosscoder, n_latents: -1}}\n",
        "n_latents'",
    ),
    "variant-layers": (
        "variants:\n  - {name: a, layers: [0, 9], coder: {kind: crosscoder}}\n",
        "'layers'",
    ),
    "variant-string-number": (
        "variants:\n  - {name: a, coder: {kind: crosscoder}, training: {lr: '1e-3'}}\n",
        "'training.lr'",
    ),
}


@pytest.mark.parametrize("case", sorted(EXPERIMENT_CASES))
def test_bad_experiment_value_fails_before_harvest(tmp_path, case):
    text, field = EXPERIMENT_CASES[case]
    (tmp_path / "h.yaml").write_text(
        f"model: {{source: random}}\nrun: {{cache_root: {tmp_path / 'cache'}}}\n"
    )
    path = tmp_path / "e.yaml"
    variants = "" if case.startswith("variant") else "variants:\n  - {name: a, coder: {}}\n"
    path.write_text(f"name: e\nharvest: h.yaml\n{variants}{text}")
    with pytest.raises(ManifestError) as caught:
        load_experiment(path)
    assert field in one_line(str(caught.value))
    output = cli_error(["run", str(path), "--results", str(tmp_path / "results")])
    assert field in output
    assert not (tmp_path / "cache").exists(), "harvested before the manifest was checked"


def test_debug_flag_shows_the_traceback(tmp_path):
    path = tmp_path / "h.yaml"
    path.write_text("tokenization: {context_length: '64'}\n")
    result = CliRunner().invoke(main, ["--debug", "harvest", str(path)])
    assert result.exit_code == 1
    assert isinstance(result.exception, ManifestError)


# --- the real model ----------------------------------------------------------------------


@pytest.mark.slow
def test_store_and_checkpoint_faults_on_the_real_model(tmp_path, monkeypatch, capsys):
    """SmolLM2 store: each file kind damaged is named; a damaged checkpoint is skipped."""
    store = harvest_real_small(tmp_path / "real-cache")
    hook = ActivationStore(store).hook_names[1]
    files = [
        "tokens.parquet",
        "documents.parquet",
        "stats.safetensors",
        "activations.zarr/zarr.json",
        f"activations.zarr/{hook}/zarr.json",
        "blocks/000001.safetensors",
        f"activations.zarr/{hook}/c/1/0",
    ]
    for relative in files:
        for how in DAMAGE:
            copy = tmp_path / "copies" / f"{relative.replace('/', '_')}-{how}" / store.name
            shutil.copytree(store, copy)
            verify = how == "flip" and relative.startswith(("blocks/", "activations.zarr/b"))
            store_fault(copy, relative, how, verify=verify or relative.endswith("/0"))
    ActivationStore(store, verify=True)

    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    manifest = run_manifest(store, tokens=3200, checkpoint_every=10)  # 50 steps
    for where in (clean, faulty):
        where.mkdir()
        monkeypatch.chdir(where)
        train.run([(manifest, where)])
    root = faulty / "runs" / store.name / manifest.run_hash()
    shutil.rmtree(RunPaths(root).final)
    flip(RunPaths(root).checkpoints()[0] / "optimizer.safetensors")
    capsys.readouterr()
    (resumed,) = train.run([(manifest, faulty)])
    assert resumed.steps == 50
    assert "skipping checkpoint checkpoint-000000040" in capsys.readouterr().err
    reference = clean / "runs" / store.name / manifest.run_hash()
    assert_same_as_reference(root, reference)


def test_yaml_exponent_without_a_dot_is_a_float(tmp_path):
    """YAML 1.1 reads 3e-4 as a string; strict manifests would then refuse a normal lr."""
    from pipeline.training.manifest import load_coder_manifest

    path = tmp_path / "c.yaml"
    path.write_text("name: c\ncache: {key: abc}\ncoder: {kind: crosscoder}\ntraining: {lr: 3e-4}\n")
    manifest, _ = load_coder_manifest(path)
    assert manifest.training.lr == pytest.approx(3e-4)
