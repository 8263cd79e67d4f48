"""The Python API: the README's example (docs/api_example.py) runs; datasets, raw-unit
coders and result tables behave as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from torch.utils.data import DataLoader

import pipeline
from pipeline import load_coder, load_results, open_store
from pipeline.training.checkpoint import load_coder as load_checkpoint
from pipeline.training.loader import split_rows
from stages import evaluate
from tests.trained_runs import TrainedRuns, train_tiny_runs

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "api_example.py"


@pytest.fixture(scope="module")
def trained_runs(tiny_cache_root, tmp_path_factory) -> TrainedRuns:
    runs = train_tiny_runs(tiny_cache_root, tmp_path_factory.mktemp("runs"))
    options = evaluate.EvaluateOptions(
        latents_sampled=2, splice=False, max_tokens=512, masking_tokens=256, progress=False,
        device="cpu",
    )  # fmt: skip
    evaluate.run([runs.fmx], tmp_path_factory.mktemp("report"), options)
    return runs


def test_readme_example_runs(trained_runs: TrainedRuns, monkeypatch, capsys) -> None:
    source = EXAMPLE.read_text()
    for old, new in (
        ('"2aedd5f3"', f'"{trained_runs.key[:8]}"'),
        ('"fmxcoder"', '"tiny-fmx"'),
    ):
        assert old in source
        source = source.replace(old, new)
    monkeypatch.setenv("FMX_CACHE_DIR", str(trained_runs.cache_root))
    monkeypatch.setenv("FMX_RUNS_DIR", str(trained_runs.runs_root))
    exec(compile(source, str(EXAMPLE), "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    assert "torch.Size([256, 4, 64])" in out and "tiny-fmx: L0" in out
    assert "'variant': 'tiny-fmx'" in out  # the evaluation summary row


def test_import_pipeline_does_not_load_torch() -> None:
    code = "import sys, pipeline; assert 'torch' not in sys.modules; print(pipeline.__all__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pipeline.nope  # noqa: B018


def test_dataset_is_one_shuffled_epoch_per_pass(trained_runs: TrainedRuns) -> None:
    store = open_store(trained_runs.cache_root / trained_runs.key)
    assert store.layers == [0, 1, 2, 3] and len(store.hook_names) == 4
    assert isinstance(store.tokens(), pa.Table) and store.tokens().num_rows == store.n_tokens
    dataset = store.dataset(batch_size=100, split="train")
    first = list(DataLoader(dataset, batch_size=None))
    second = list(DataLoader(dataset, batch_size=None))
    n_train = len(split_rows(store._store, "train"))
    assert sum(len(b) for b in first) == n_train and len(first) == len(dataset)
    assert first[0].shape[1:] == (4, 64) and first[0].dtype == torch.float32
    assert not torch.equal(first[0], second[0])  # a new epoch, a new order
    norms = torch.cat(first).norm(dim=-1).mean(0)  # normalised: E||x_l|| ~ sqrt(d) = 8
    assert torch.all((norms > 4) & (norms < 12)), norms


def test_coder_works_on_raw_activations(trained_runs: TrainedRuns) -> None:
    store = open_store(trained_runs.key, cache_root=trained_runs.cache_root)
    coder = load_coder("tiny-sae", runs_root=trained_runs.runs_root)
    raw = store.read(0, 64)
    inner = load_checkpoint(trained_runs.sae / "final")
    normaliser = store.normaliser(centre=True)
    with torch.no_grad():
        expected = normaliser.invert(inner(normaliser.apply(raw)))
    torch.testing.assert_close(coder(raw), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(coder.encode(raw), inner.encode(normaliser.apply(raw)))
    assert coder.hook_names == store.hook_names and coder.name == "tiny-sae"


def test_results_as_pyarrow_and_pandas(trained_runs: TrainedRuns) -> None:
    tables = load_results(trained_runs.fmx)
    assert {"summary", "per_layer", "latents"} <= set(tables)
    assert tables["summary"].column("variant").to_pylist() == ["tiny-fmx"]
    assert tables["per_layer"].num_rows == 4
    frames = load_results(trained_runs.fmx, pandas=True)
    assert frames["per_layer"].shape[0] == 4
    with pytest.raises(FileNotFoundError, match="no evaluation results"):
        load_results(trained_runs.sae)


def test_read_by_hook_names_picks_the_coders_layers(trained_runs: TrainedRuns) -> None:
    store = open_store(trained_runs.key, cache_root=trained_runs.cache_root)
    hooks = store.hook_names
    picked = store.read(0, 16, hooks=[hooks[2], hooks[0]])
    torch.testing.assert_close(picked, store.read(0, 16)[:, [2, 0]], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"does not store \['blocks.99.hook_resid_post'\]"):
        store.read(0, 16, hooks=["blocks.99.hook_resid_post"])
    with pytest.raises(ValueError, match="layers or hooks, not both"):
        store.read(0, 16, layers=[0], hooks=hooks[:1])


def test_results_found_in_the_report_that_pipeline_run_wrote(
    trained_runs: TrainedRuns, tmp_path, monkeypatch
) -> None:
    """`pipeline run` may reuse its report without writing into the run directory: the
    run's rows come from results/<name>/report/ (only its own rows)."""
    import json

    import pyarrow.parquet as pq

    from pipeline.evaluation.results import run_id

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FMX_REPORTS_DIR", str(tmp_path / "reports"))
    with pytest.raises(FileNotFoundError, match="no evaluation results"):
        load_results(trained_runs.sae)
    report = tmp_path / "results" / "exp" / "report"
    report.mkdir(parents=True)
    rows = [
        {"variant": "other", "run_dir": "k/other", "fvu": 0.9},
        {"variant": "tiny-sae", "run_dir": run_id(trained_runs.sae), "fvu": 0.25},
    ]
    (report / "results.json").write_text(json.dumps({"variants": rows}))
    per_layer = {"variant": ["other", "tiny-sae", "tiny-sae"], "layer": [0, 0, 1]}
    pq.write_table(pa.table(per_layer), report / "per_layer.parquet")
    tables = load_results(trained_runs.sae)
    assert tables["summary"].to_pylist() == [rows[1]]
    assert tables["per_layer"].column("variant").to_pylist() == ["tiny-sae", "tiny-sae"]
