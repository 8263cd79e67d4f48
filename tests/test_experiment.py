"""`pipeline run`: one harvest, every variant, one evaluation, one table; resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.experiment_manifest import load_experiment
from pipeline.manifest_io import ManifestError
from stages import experiment

REPO = Path(__file__).resolve().parents[1]


def _isolated(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FMX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FMX_RUNS_DIR", str(tmp_path / "runs"))


def test_tiny_experiment_end_to_end_then_resumes_without_work(monkeypatch, tmp_path):
    _isolated(monkeypatch, tmp_path)
    manifest = REPO / "manifests" / "experiments" / "tiny.yaml"
    result = experiment.run(manifest, tmp_path / "results")
    assert [row["variant"] for row in result.table] == ["per-layer-sae", "crosscoder", "fmxcoder"]
    assert result.table[1]["mse_change_vs_crosscoder"] == 0.0
    sae = result.table[0]
    assert sae["fc_n_eff"] == pytest.approx(1.0)
    for name in ("table.md", "table.json", "experiment.yaml", "harvest.yaml", "report/index.html"):
        assert (result.results / name).is_file(), name
    summary = (result.results / "report" / "results.json").stat().st_mtime_ns

    import stages.evaluate
    import stages.harvest

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished step ran again")

    monkeypatch.setattr(stages.harvest, "load_model", forbidden)
    monkeypatch.setattr(stages.evaluate, "run", forbidden)
    again = experiment.run(manifest, tmp_path / "results")
    assert again.table == json.loads((result.results / "table.json").read_text())
    assert (result.results / "report" / "results.json").stat().st_mtime_ns == summary


def test_variant_errors_name_the_variant(tmp_path):
    bad = tmp_path / "bad.yaml"
    (tmp_path / "h.yaml").write_text("model: {source: random}\n")
    bad.write_text(
        "name: bad\nharvest: h.yaml\nvariants:\n"
        "  - name: a\n    coder: {kind: crosscoder}\n    trainng: {}\n"
    )
    with pytest.raises(ManifestError, match=r"variants\[0\] 'a'.*field 'trainng': unknown field"):
        load_experiment(bad)  # before anything is harvested


def test_missing_harvest_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nharvest: nope.yaml\nvariants: []\n")
    result = CliRunner().invoke(main, ["run", str(bad)])
    assert result.exit_code == 1
    assert "field 'harvest': no file" in result.output


@pytest.mark.slow
def test_smoke_experiment_on_the_real_model(monkeypatch, tmp_path):
    """The README's main command: real SmolLM2, real Wikipedia, every variant."""
    _isolated(monkeypatch, tmp_path)
    manifest = REPO / "manifests" / "experiments" / "smoke.yaml"
    result = experiment.run(manifest, tmp_path / "results")
    expected, _ = load_experiment(manifest)
    assert [row["variant"] for row in result.table] == [v["name"] for v in expected.variants]
    for row in result.table:
        assert 0 < row["fvu"] < 1, row
        assert row["l0"] > 0, row
