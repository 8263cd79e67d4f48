"""Fault injection, round 2 (issue 21): what reports a run reads only checksummed files and
lists a damaged run as broken; non-finite numbers, duplicate YAML keys and blank names are
refused; SIGTERM is handled like Ctrl-C; disk full and memory are one line with the
figures; a damaged or record-less store gets advice that works."""

# ruff: noqa: F811  (the fixtures tiny_store and reference come from tests/test_faults.py)

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.paths import RunPaths, StorePaths
from pipeline.store.catalog import find_run, list_runs
from pipeline.store.reader import ActivationStore
from pipeline.store.writer import StoreWriter
from stages import train
from tests.helpers import TINY, almost_full
from tests.test_faults import (
    assert_same_as_reference,
    cli_error,
    copy_store,
    flip,
    one_line,
    reference,  # noqa: F401
    retrain,
    run_dir,
    run_manifest,
    tiny_store,  # noqa: F401
    train_in_subprocess,
    truncate,
    write_coder_yaml,
)


@pytest.fixture(autouse=True)
def private_runs_root(tmp_path, monkeypatch):
    """Manifests without run.runs_root must not write into the shared data directory."""
    monkeypatch.setenv("FMX_RUNS_DIR", str(tmp_path / "runs"))


def error_line(args: list[str]) -> str:
    """The one ``Error:`` line a failing command ends stderr with (a model's loading bar
    may come before it; the log lines of a started stage go to stdout)."""
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if "Error" in line]
    assert len(errors) == 1 and result.stderr.splitlines()[-1] == errors[0], result.stderr
    assert errors[0].startswith("Error: ")
    return errors[0]


def tiny_yaml(tmp_path: Path) -> Path:
    """The harvest manifest of ``tiny_store`` as a file."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


# --- pipeline runs: figures only from checksummed files, one bad run never hides others --


def copy_runs(reference: Path, tmp_path: Path, n: int = 2) -> list[Path]:
    """``n`` copies of the reference run, each under its own cache key directory."""
    copies = []
    for i in range(n):
        target = tmp_path / "runs" / f"cache{i}" / reference.name
        shutil.copytree(reference, target, ignore=shutil.ignore_patterns("tensorboard"))
        copies.append(target)
    return copies


def rows_by_cache(runs_root: Path) -> dict[str, object]:
    return {row.cache: row for row in list_runs(runs_root)}


def last_logged(run: Path) -> dict:
    return json.loads(RunPaths(run).metrics.read_text().splitlines()[-1])


def test_final_summary_holds_the_last_logged_figures(reference):
    summary = json.loads((RunPaths(reference).final / "summary.json").read_text())
    expected = {k: v for k, v in last_logged(reference).items() if k != "tokens_per_second"}
    assert summary == expected and summary["step"] == 100
    listed = json.loads((RunPaths(reference).final / "checksums.json").read_text())["files"]
    assert "summary.json" in listed, "the summary is outside final/'s checksums"


def test_truncated_metrics_log_does_not_change_what_runs_reports(reference, tmp_path):
    """The issue's silent case: a half metrics.jsonl made `runs` print FVU 0.520, not 0.204."""
    (run,) = copy_runs(reference, tmp_path, 1)
    truth = last_logged(reference)
    truncate(RunPaths(run).metrics)
    (row,) = list_runs(tmp_path / "runs")
    assert row.state == "complete" and row.steps == 100
    assert row.fvu == truth["fvu"] and row.l0 == truth["l0"]


@pytest.mark.parametrize(
    "name", ["coder.safetensors", "normalisation.safetensors", "summary.json", "coder.json"]
)
def test_damaged_final_is_listed_broken_and_the_other_runs_stay(reference, tmp_path, name):
    _, bad = copy_runs(reference, tmp_path)
    flip(RunPaths(bad).final / name)
    rows = rows_by_cache(tmp_path / "runs")
    assert rows["cache1"].state.startswith(f"broken (final/{name}: checksum mismatch")
    assert rows["cache1"].fvu != rows["cache1"].fvu, "a broken run still shows a figure"
    assert rows["cache0"].state == "complete"
    assert rows["cache0"].fvu == last_logged(reference)["fvu"]
    result = CliRunner().invoke(main, ["runs", "--runs-root", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert len(result.output.splitlines()) == 3  # header + both runs
    assert f"broken (final/{name}: checksum mismatch" in result.output


@pytest.mark.parametrize("where", ["name", "metrics.jsonl", "coder_manifest.json"])
def test_non_utf8_byte_names_the_file_and_hides_no_other_run(reference, tmp_path, where):
    good, bad = copy_runs(reference, tmp_path)
    for run in (good, bad):  # unfinished runs read their log
        shutil.rmtree(RunPaths(run).final)
    path = bad / where
    path.write_bytes(path.read_bytes()[:20] + b"\xff\xfe" + path.read_bytes()[20:])
    result = CliRunner().invoke(main, ["runs", "--runs-root", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 3
    assert f"broken ({where}: 'utf-8' codec can't decode" in lines[2]
    assert lines[1].rstrip().endswith("running")  # its log was just copied


def test_untrained_control_is_not_called_complete(tiny_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train.run([(run_manifest(tiny_store, tokens=0), tmp_path)])
    (row,) = list_runs(tmp_path / "runs")
    assert (row.state, row.steps, row.total_steps) == ("untrained", 0, 0)


def test_two_names_with_the_same_settings_keep_both(tiny_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = run_manifest(tiny_store, tokens=640)
    second = first.model_copy(update={"name": "faults-again"})
    results = train.run([(first, tmp_path), (second, tmp_path)])
    assert [r.name for r in results] == ["faults", "faults-again"]
    assert results[0].run_dir == results[1].run_dir
    (run,) = [p for p in (tmp_path / "runs").glob("*/*") if p.is_dir()]
    assert (run / "name").read_text() == "faults\nfaults-again\n"
    third = first.model_copy(update={"name": "third"})  # a later, separate train
    (later,) = train.run([(third, tmp_path)])
    assert later.skipped
    assert (run / "name").read_text().splitlines() == ["faults", "faults-again", "third"]
    assert (
        find_run("faults-again", tmp_path / "runs") == run == find_run("third", tmp_path / "runs")
    )


# --- manifests: finite numbers, unique keys, real names ----------------------------------

CODER_CASES = {
    "lr-inf": ("training: {lr: .inf}\n", "field 'training.lr': must be a finite number"),
    "lr-nan": ("training: {lr: .nan}\n", "field 'training.lr': must be a finite number"),
    "clip-inf": ("training: {grad_clip: .inf}\n", "'training.grad_clip': must be a finite"),
    "ratio-inf": ("training: {outlier_norm_ratio: .inf}\n", "'training.outlier_norm_ratio'"),
    "duplicate-key": ("training: {tokens: 64, tokens: 128}\n", "duplicate key 'tokens'"),
    "duplicate-section": (
        "training: {tokens: 64}\nrun: {}\ntraining: {tokens: 128}\n",
        "duplicate key 'training' (first on line 4) (line 6",
    ),
}


@pytest.mark.parametrize("case", sorted(CODER_CASES))
def test_bad_coder_value_is_one_line(tiny_store, tmp_path, monkeypatch, case):
    text, expected = CODER_CASES[case]
    path = write_coder_yaml(tmp_path, tiny_store, text)
    monkeypatch.chdir(tmp_path)
    assert expected in cli_error(["train", str(path)])
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ['""', "'   '", '"a\\nb"'])
def test_blank_or_multiline_name_is_refused(tiny_store, tmp_path, monkeypatch, name):
    path = write_coder_yaml(tmp_path, tiny_store, "")
    path.write_text(path.read_text().replace("name: bad", f"name: {name}"))
    monkeypatch.chdir(tmp_path)
    assert "field 'name'" in cli_error(["train", str(path)])


HARVEST_CASES = {
    "fraction-nan": ("tokenization: {test_fraction: .nan}\n", "'tokenization.test_fraction'"),
    "duplicate-key": ("tokenization: {seed: 1, seed: 2}\n", "duplicate key 'seed'"),
    "planted-inf": (
        "model: {source: planted, planted: {noise_std: .inf}}\n",
        "'model.planted.noise_std': must be a finite number",
    ),
}


@pytest.mark.parametrize("case", sorted(HARVEST_CASES))
def test_bad_harvest_value_is_one_line(tmp_path, case):
    text, expected = HARVEST_CASES[case]
    path = tmp_path / "h.yaml"
    path.write_text(text if case == "planted-inf" else "model: {source: random}\n" + text)
    assert expected in cli_error(["harvest", str(path), "--cache-root", str(tmp_path / "c")])
    assert not (tmp_path / "c").exists()


def test_experiment_names_must_not_be_blank(tmp_path):
    (tmp_path / "h.yaml").write_text("model: {source: random}\n")
    path = tmp_path / "e.yaml"
    path.write_text('name: ""\nharvest: h.yaml\nvariants:\n  - {name: a, coder: {}}\n')
    assert "field 'name': must not be empty" in cli_error(["run", str(path)])
    path.write_text('name: e\nharvest: h.yaml\nvariants:\n  - {name: " ", coder: {}}\n')
    assert "variants[0].name must not be empty" in cli_error(["run", str(path)])


def test_binary_manifest_is_one_line(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_bytes(b"name: a\xff\n")
    assert f"{path}: not UTF-8 text" in cli_error(["train", str(path)])


# --- non-finite loss ---------------------------------------------------------------------


def test_non_finite_loss_stops_at_the_step_and_keeps_the_good_checkpoint(
    tiny_store, reference, tmp_path, monkeypatch
):
    """A NaN loss from step 60 on: the run stops before checkpoint 75 is written, names
    the step, and a rerun resumes from checkpoint 50 to the reference's bytes."""
    from pipeline.coders.base import SparseCoder as Coder  # every kind's training_loss
    from pipeline.training.trainer import NonFiniteLossError

    original = Coder.training_loss

    def poisoned(self, batch, step, total):
        out = original(self, batch, step, total)
        if step >= 60:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Coder, "training_loss", poisoned)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NonFiniteLossError) as caught:
        train.run([(run_manifest(tiny_store), tmp_path)])
    message = one_line(str(caught.value))
    assert "the loss was not finite at step 60" in message
    assert "checkpoint-000000050 is the last good checkpoint" in message
    root = run_dir(tmp_path, tiny_store)
    assert RunPaths(root).checkpoints()[0].name == "checkpoint-000000050"
    assert not RunPaths(root).final.exists() and not RunPaths(root).lock.exists()
    monkeypatch.setattr(Coder, "training_loss", original)
    assert retrain(tiny_store, tmp_path, monkeypatch).steps == 100
    assert_same_as_reference(root, reference)


def test_huge_learning_rate_is_one_line_and_saves_nothing(tiny_store, tmp_path, monkeypatch):
    text = "training: {tokens: 640, batch_size: 64, lr: 1.0e+30}\n"
    path = write_coder_yaml(tmp_path, tiny_store, text)
    monkeypatch.chdir(tmp_path)
    output = error_line(["train", str(path)])
    assert "the loss was not finite at step" in output
    assert not list((tmp_path / "runs").glob("*/*/final"))


# --- SIGTERM -----------------------------------------------------------------------------


def test_sigterm_in_training_exits_143_in_one_line_and_resumes(
    tiny_store, reference, tmp_path, monkeypatch
):
    root = run_dir(tmp_path, tiny_store)
    stopped = train_in_subprocess(tmp_path, tiny_store, "sealed@checkpoint-000000050", "SIGTERM")
    assert stopped.returncode == 143, stopped.stderr
    assert stopped.stderr.strip().splitlines() == [
        "Error: stopped by SIGTERM; locks released, the partial work is kept: rerun the "
        "same command to resume"
    ]
    assert not RunPaths(root).lock.exists(), "SIGTERM left the run lock"
    assert RunPaths(root).checkpoints()[0].name == "checkpoint-000000050"
    assert retrain(tiny_store, tmp_path, monkeypatch).steps == 100
    assert_same_as_reference(root, reference)


def test_sigterm_in_harvest_releases_the_lock_and_resumes(tiny_store, tmp_path, monkeypatch):
    """The writer thread's second block sends SIGTERM; the main thread unwinds."""
    original = StoreWriter.write_block

    def terminate_at_block_1(self, block, stored, keep):
        if block == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, block, stored, keep)

    monkeypatch.setattr(StoreWriter, "write_block", terminate_at_block_1)
    cache = tmp_path / "cache"
    args = harvest_args(tmp_path, cache)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 143, result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: stopped by SIGTERM")
    assert not list(cache.glob("*.lock")), "SIGTERM left the store lock"
    assert [p.name.endswith(".incomplete") for p in cache.iterdir()] == [True]
    monkeypatch.setattr(StoreWriter, "write_block", original)
    assert CliRunner().invoke(main, args).exit_code == 0
    (store,) = [p for p in cache.iterdir() if p.is_dir()]
    ActivationStore(store, verify=True)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the handler outlived the command"


# --- disk full and memory ----------------------------------------------------------------


def no_space(path: str):
    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    return fail


def test_disk_full_in_harvest_is_one_line_and_resumes(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(StoreWriter, "write_block", no_space(str(cache / "chunk")))
    args = harvest_args(tmp_path, cache)
    output = error_line(args)
    assert output.startswith(f"Error: {cache / 'chunk'}: no space left on device while writing")
    assert "rerun" in output and not list(cache.glob("*.lock"))
    monkeypatch.undo()
    assert CliRunner().invoke(main, args).exit_code == 0


def test_disk_full_in_training_is_one_line_and_resumes(
    tiny_store, reference, tmp_path, monkeypatch
):
    from pipeline.training import trainer

    original = trainer.save_training_state
    calls = []

    def full_at_second_checkpoint(path, tensors, meta):
        calls.append(path)
        if len(calls) == 2:
            no_space(str(path))()
        return original(path, tensors, meta)

    monkeypatch.setattr(trainer, "save_training_state", full_at_second_checkpoint)
    path = tmp_path / "m.json"
    path.write_text(run_manifest(tiny_store).model_dump_json())
    monkeypatch.chdir(tmp_path)
    output = error_line(["train", str(path)])
    root = run_dir(tmp_path, tiny_store)
    assert output.startswith(f"Error: {RunPaths(root).checkpoint(50).relative_to(tmp_path)}/")
    assert "no space left on device" in output
    monkeypatch.setattr(trainer, "save_training_state", original)
    assert retrain(tiny_store, tmp_path, monkeypatch).steps == 100
    assert_same_as_reference(root, reference)


def test_harvest_refuses_up_front_when_the_store_cannot_fit(tmp_path, monkeypatch):
    almost_full(monkeypatch)
    cache = tmp_path / "cache"
    output = error_line(harvest_args(tmp_path, cache))
    assert "this harvest (uncompressed upper bound) needs about" in output
    assert "but only 1.0 KB is free there" in output
    assert not [p for p in cache.iterdir() if p.is_dir()], "a store was started"


def test_train_refuses_up_front_when_checkpoints_cannot_fit(tiny_store, tmp_path, monkeypatch):
    almost_full(monkeypatch)
    path = write_coder_yaml(tmp_path, tiny_store, "training: {batch_size: 64}\n")
    monkeypatch.chdir(tmp_path)
    output = cli_error(["train", str(path)])
    assert "run 'bad' (checkpoints + final) needs about" in output
    assert not (tmp_path / "runs").exists()


def test_coder_too_big_for_memory_is_refused_before_allocating(tiny_store, tmp_path, monkeypatch):
    text = "coder: {kind: crosscoder, n_latents: 1000000000000, activation: topk, k: 4}\n"
    path = tmp_path / "coder.yaml"
    path.write_text(f"name: big\ncache: {{key: {tiny_store.name}, root: {tiny_store.parent}}}\n")
    path.write_text(path.read_text() + text + "training: {batch_size: 64}\n")
    monkeypatch.chdir(tmp_path)
    output = cli_error(["train", str(path)])
    assert "field 'coder.n_latents': 513,000,000,000,256 parameters need about 82" in output
    assert "TB for weights, gradients and Adam state;" in output
    assert not (tmp_path / "runs").exists(), "an orphan run directory was left"


@pytest.mark.parametrize(
    "coder",
    [
        {"kind": "crosscoder", "n_latents": 96, "k": 4},
        {"kind": "per_layer_sae", "latents_per_layer": 24, "k": 2},
        {"kind": "fmxcoder", "n_latents": 96, "k": 4, "encoder_factorization": "dense",
         "decoder_factorization": "dense"},
        *(
            {"kind": "fmxcoder", "n_latents": 96, "k": 4, "rank": rank,
             "encoder_factorization": reading, "decoder_factorization": reading}
            for reading, ranks in (("per_latent", (1, 5)), ("shared_basis", (1, 5)),
                                   ("cp", (1, 700)))
            for rank in ranks
        ),
    ],
)  # fmt: skip
def test_cheap_size_bound_is_never_below_the_exact_count(coder):
    """check_resources skips the exact (meta-device) count when the bound fits."""
    from pipeline.coders import coder_config_from_dict

    config = coder_config_from_dict({**coder, "n_layers": 5, "d_model": 32})
    exact, bound = train.coder_size(config), train.size_bound(config)
    assert bound[0] >= exact[0] and bound[1] >= exact[1]


def test_memory_error_anywhere_is_one_line(tiny_store, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(train, "new_coder_run", out_of_memory)
    path = write_coder_yaml(tmp_path, tiny_store, "training: {batch_size: 64}\n")
    monkeypatch.chdir(tmp_path)
    assert cli_error(["train", str(path)]).startswith("Error: out of memory: MemoryError")


# --- damaged stores: honest cache hits, advice that works, one line ----------------------


def harvest_args(tmp_path: Path, cache: Path) -> list[str]:
    return ["harvest", str(tiny_yaml(tmp_path)), "--cache-root", str(cache)]


def test_cache_hit_says_it_was_not_fully_verified(tiny_store, tmp_path):
    store = copy_store(tiny_store, tmp_path)
    flip(store / "activations.zarr/blocks.1.hook_resid_post/c/1/0")  # same size
    result = CliRunner().invoke(main, harvest_args(tmp_path, store.parent))
    assert result.exit_code == 0 and result.stdout.split()[1:3] == ["cache", "hit"]
    assert f"not fully verified (chunks unread): `pipeline show {store.name} --verify`" in (
        result.stderr
    )


def test_cache_hit_on_a_damaged_table_is_refused(tiny_store, tmp_path):
    store = copy_store(tiny_store, tmp_path)
    flip(store / "tokens.parquet")
    assert "tokens.parquet: checksum mismatch" in cli_error(harvest_args(tmp_path, store.parent))


def test_deleted_completion_record_advice_works(tiny_store, tmp_path, monkeypatch):
    """The issue's case: train advised `pipeline harvest`, which then crashed with
    'Directory not empty'; show gave no remedy."""
    store = copy_store(tiny_store, tmp_path)
    StorePaths(store).completion.unlink()
    monkeypatch.chdir(tmp_path)
    coder = write_coder_yaml(tmp_path, store, "")
    output = cli_error(["train", str(coder)])
    assert output.startswith(f"Error: {store}: not a finished store (complete.json is missing")
    assert "pipeline harvest" in output
    shown = cli_error(["show", store.name, "--cache-root", str(store.parent)])
    assert "pipeline harvest" in shown
    result = CliRunner().invoke(main, harvest_args(tmp_path, store.parent))
    assert result.exit_code == 0, result.output
    assert "has no complete.json (damaged); harvesting it again and replacing it" in result.stderr
    assert sorted(p.name for p in store.parent.iterdir()) == [store.name]
    ActivationStore(store, verify=True)


def test_train_on_a_damaged_store_prints_one_line(tiny_store, tmp_path, monkeypatch):
    store = copy_store(tiny_store, tmp_path)
    flip(store / "stats.safetensors")
    tiny_yaml(tmp_path)
    coder = tmp_path / "c.yaml"
    coder.write_text(
        f"name: c\ncache: {{harvest_manifest: tiny.yaml, root: {store.parent}}}\n"
        "coder: {kind: crosscoder, n_latents: 64, activation: topk, k: 4}\n"
    )
    monkeypatch.chdir(tmp_path)
    output = cli_error(["train", str(coder)])
    assert output.startswith(f"Error: {store / 'stats.safetensors'}: checksum mismatch")
    assert "not ready" not in output


def test_merge_keys_are_not_duplicates_and_what_stands_beside_them_wins(tmp_path):
    """The example experiments share settings through YAML anchors (``<<: *base``); the
    duplicate-key check leaves those alone, and an explicit key overrides the merged one."""
    from pipeline.manifests.io import read_mapping

    path = tmp_path / "m.yaml"
    path.write_text("base: &base {lr: 0.1, k: 4}\nvariant: {<<: *base, k: 8}\n")
    assert read_mapping(path)["variant"] == {"lr": 0.1, "k": 8}
    path.write_text("base: &base {lr: 0.1}\nvariant: {<<: *base, k: 8, k: 16}\n")
    with pytest.raises(ValueError, match="duplicate key 'k'"):
        read_mapping(path)
