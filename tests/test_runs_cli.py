"""Self-contained final checkpoints, `pipeline runs`, and `pipeline export` by name/hash."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.store.reader import ActivationStore
from pipeline.training.checkpoint import load_coder, read_coder_json
from pipeline.training.export import dictionary_learning_forward, saelens_forward
from pipeline.training.loader import Normaliser
from pipeline.training.run_record import read_record
from tests.trained_runs import TrainedRuns, train_tiny_runs


@pytest.fixture(scope="module")
def trained_runs(tiny_cache_root, tmp_path_factory) -> TrainedRuns:
    return train_tiny_runs(tiny_cache_root, tmp_path_factory.mktemp("runs"))


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_final_records_normalisation_and_provenance(trained_runs: TrainedRuns) -> None:
    store = ActivationStore(trained_runs.cache_root / trained_runs.key)
    record = read_record(trained_runs.fmx / "final")
    assert record is not None and record.name == "tiny-fmx"
    assert record.hook_names == store.hook_names
    expected = Normaliser.from_store(store, list(range(store.n_layers)), centre=True)
    assert torch.equal(record.mean, expected.mean) and torch.equal(record.scale, expected.scale)
    extra = read_coder_json(trained_runs.fmx / "final")["extra"]
    assert extra["hook_names"] == store.hook_names and extra["model"]["source"] == "random"
    assert (trained_runs.fmx / "name").read_text().strip() == "tiny-fmx"


def test_runs_lists_names_state_and_metrics(trained_runs: TrainedRuns) -> None:
    result = invoke("runs", "--runs-root", str(trained_runs.runs_root))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["name", "cache", "run"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"tiny-sae", "tiny-fmx"}
    assert rows["tiny-fmx"][3] == "fmxcoder" and rows["tiny-fmx"][4] == "8/8"
    assert rows["tiny-sae"][-1] == "complete"
    assert 0 < float(rows["tiny-fmx"][5]) < 2  # FVU from the training log


def test_export_by_name_and_hash_reproduces_on_store_rows(trained_runs: TrainedRuns, tmp_path):
    root = str(trained_runs.runs_root)
    out = tmp_path / "sae"
    result = invoke("export", "tiny-sae", str(out), "--format", "saelens", "--runs-root", root)
    assert result.exit_code == 0, result.output
    store = ActivationStore(trained_runs.cache_root / trained_runs.key)
    raw = store.read(0, 64)  # raw activations [64, L, d]
    record = read_record(trained_runs.sae / "final")
    coder = load_coder(trained_runs.sae / "final")
    with torch.no_grad():
        ours = record.denormalise(coder(record.normalise(raw)))
    for layer, hook in enumerate(store.hook_names):
        got = saelens_forward(out / hook, raw[:, layer])
        torch.testing.assert_close(got, ours[:, layer], atol=1e-4, rtol=1e-4)

    prefix = trained_runs.fmx.name[:6]
    out = tmp_path / "fmx"
    fmt = ["--format", "dictionary_learning", "--runs-root", root]
    assert invoke("export", prefix, str(out), *fmt).exit_code == 0
    record = read_record(trained_runs.fmx / "final")
    coder = load_coder(trained_runs.fmx / "final")
    with torch.no_grad():
        ours = record.denormalise(coder(record.normalise(raw)))
    torch.testing.assert_close(dictionary_learning_forward(out, raw), ours, atol=1e-4, rtol=1e-4)
    assert json.loads((out / "fmxcoders.json").read_text())["class"] == "BatchTopKCrossCoder"


def test_unknown_run_and_wrong_format_are_one_line_errors(trained_runs: TrainedRuns, tmp_path):
    root = str(trained_runs.runs_root)
    result = invoke("export", "nope", str(tmp_path), "--format", "saelens", "--runs-root", root)
    assert result.exit_code == 1
    assert result.output.strip() == "Error: no run named or hashed 'nope' (see `pipeline runs`)"
    result = invoke("export", "tiny-fmx", str(tmp_path), "--format", "saelens", "--runs-root", root)
    assert result.exit_code == 1 and "per-layer SAE runs" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_states_running_incomplete_broken(tmp_path) -> None:
    from pipeline.store.catalog import find_run, list_runs

    record = {"manifest": {"name": "x", "training": {"tokens": 1000, "batch_size": 100}},
              "coder": {"kind": "crosscoder"}}  # fmt: skip
    for run_hash, log_age in (("aaa111", 0), ("bbb222", 3600)):
        run = tmp_path / "cachekey" / run_hash
        run.mkdir(parents=True)
        (run / "coder_manifest.json").write_text(json.dumps(record))
        (run / "metrics.jsonl").write_text('{"step": 4, "fvu": 0.5, "l0": 3.0}\n')
        old = (run / "metrics.jsonl").stat().st_mtime - log_age
        os.utime(run / "metrics.jsonl", (old, old))
    (tmp_path / "cachekey" / "ccc333").mkdir()  # no record at all
    states = {r.run_hash: (r.state, r.steps, r.total_steps, r.fvu) for r in list_runs(tmp_path)}
    assert states["aaa111"] == ("running", 4, 10, 0.5)
    assert states["bbb222"][0] == "incomplete"
    assert states["ccc333"][0] == "broken (coder_manifest.json: no such file or directory)"
    assert find_run("bbb", tmp_path).name == "bbb222"
    with pytest.raises(ValueError, match="ambiguous"):
        find_run("x", tmp_path)  # two runs share the name


def test_older_run_without_normalisation_file_exports_from_its_cache(
    trained_runs: TrainedRuns, tmp_path
) -> None:
    import shutil

    old_run = tmp_path / trained_runs.key / trained_runs.sae.name
    shutil.copytree(trained_runs.sae, old_run)
    (old_run / "final" / "normalisation.safetensors").unlink()
    (old_run / "final" / "checksums.json").unlink()  # runs that old had no checksums either
    assert read_record(old_run / "final") is None
    out = tmp_path / "out"
    result = invoke("export", str(old_run), str(out), "--format", "saelens")
    assert result.exit_code == 0, result.output
    new = tmp_path / "new"
    assert invoke("export", str(trained_runs.sae), str(new), "--format", "saelens").exit_code == 0
    for folder in out.iterdir():
        a = (folder / "sae_weights.safetensors").read_bytes()
        assert a == (new / folder.name / "sae_weights.safetensors").read_bytes()
