"""`pipeline run`: one harvest, every variant, one evaluation, one table; resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.experiment.manifest import load_experiment
from pipeline.manifests.io import ManifestError
from stages import experiment

REPO = Path(__file__).resolve().parents[1]


def _isolated(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FMX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FMX_RUNS_DIR", str(tmp_path / "runs"))


def test_tiny_experiment_end_to_end_then_resumes_without_work(monkeypatch, tmp_path, capsys):
    _isolated(monkeypatch, tmp_path)
    manifest = REPO / "manifests" / "experiments" / "tiny.yaml"
    result = experiment.run(manifest, tmp_path / "results")
    assert "22 runs (6 lr-sweep, 6 trained, 6 control, 4 sparsity)" in capsys.readouterr().out
    trained = [row for row in result.table if row["role"] == "trained"]
    controls = {row["variant"]: row for row in result.table if row["role"] == "control"}
    assert [row["variant"] for row in trained] == ["per-layer-sae", "crosscoder", "fmxcoder"]
    assert set(controls) == {"per-layer-sae", "crosscoder", "fmxcoder"}
    assert "residual" in [row["variant"] for row in result.table if row["role"] == "baseline"]
    sae, crosscoder = trained[0], trained[1]
    assert crosscoder["mse_change_vs_crosscoder"] == 0.0
    assert sae["fc_n_eff"] == pytest.approx(1.0)
    assert all(row["seeds"] == 2 and "fvu_sd" in row for row in trained)
    assert crosscoder["fvu"] < controls["crosscoder"]["fvu"]  # training did something
    sweep = json.loads((result.results / "lr_sweep.json").read_text())
    for variant, entry in sweep.items():
        best = min(entry["points"], key=lambda p: p["val_fvu"])
        assert entry["chosen_lr"] == best["lr"]
        assert next(r for r in trained if r["variant"] == variant)["lr"] == best["lr"]
    frontier = json.loads((result.results / "frontier.json").read_text())
    assert [p["k"] for p in frontier["per-layer-sae"]] == [1, 2, 4]
    names = ("table.md", "table.json", "experiment.yaml", "harvest.yaml", "report/index.html")
    names += ("protocol.json",)
    names += tuple(f"frontier-{v}.png" for v in ("per-layer-sae", "crosscoder", "fmxcoder"))
    for name in names:
        assert (result.results / name).is_file(), name
    assert "floor FVU" in (result.results / "table.md").read_text()
    # the report folds runs by the labels the evaluation recorded: one row per variant
    runs = json.loads((result.results / "report" / "results.json").read_text())["variants"]
    labels = {(p["variant"], p["role"], p["seed"]) for p in (r["protocol"] for r in runs)}
    assert ("fmxcoder", "trained", 1) in labels and ("crosscoder", "control", 0) in labels
    index = (result.results / "report" / "index.html").read_text()
    assert index.split("<h2>Variants</h2>")[1].split("</table>")[0].count("<tr") == 1 + 3
    summary = (result.results / "report" / "results.json").stat().st_mtime_ns

    import stages.evaluate
    import stages.harvest
    import stages.train

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished step ran again")

    monkeypatch.setattr(stages.harvest, "load_model", forbidden)
    monkeypatch.setattr(stages.evaluate, "run", forbidden)
    monkeypatch.setattr(stages.train, "new_coder_run", forbidden)
    again = experiment.run(manifest, tmp_path / "results")
    assert again.table == json.loads(
        (result.results / "table.json").read_text(), parse_constant=float
    )
    assert (result.results / "report" / "results.json").stat().st_mtime_ns == summary
    assert "evaluate: reusing" in capsys.readouterr().out

    # a checkout has no per-latent pages (git-ignored): not current, evaluate again
    page = next((result.results / "report" / "latents").rglob("*.html"))
    page.unlink()
    with pytest.raises(AssertionError, match="a finished step ran again"):
        experiment.run(manifest, tmp_path / "results")
    assert "report file(s) missing" in capsys.readouterr().out


def _files(root: Path) -> dict[str, bytes]:
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in paths}


def test_rerun_on_another_machine_writes_identical_results(monkeypatch, tmp_path):
    """What `make smoke` relies on to leave `git status` clean: a rerun from scratch, with
    the cache and runs somewhere else, rewrites results/<name>/ byte for byte."""
    manifest = REPO / "manifests" / "experiments" / "tiny.yaml"
    monkeypatch.chdir(tmp_path)
    first = {}
    for machine in ("a", "b"):
        _isolated(monkeypatch, tmp_path / machine)
        result = experiment.run(manifest, Path("results"))
        assert not result.results.is_absolute()
        files = _files(result.results)
        if not first:
            first = files
            result.results.rename(tmp_path / "first-results")
    assert sorted(files) == sorted(first)
    changed = [name for name in first if files[name] != first[name]]
    assert not changed, f"differ between runs: {changed}"
    recorded = json.loads(files["report/results.json"])
    assert str(tmp_path) not in json.dumps(recorded)
    assert recorded["provenance"]["store"] == recorded["store"]


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
    """The README's main command: real SmolLM2, real Wikipedia, every variant; its own
    harvest, a tenth of its training steps and 1,200 held-out tokens (the suite's time)."""
    _isolated(monkeypatch, tmp_path)
    smoke = REPO / "manifests" / "experiments" / "smoke.yaml"
    shorter = yaml.safe_load(smoke.read_text())
    shorter["harvest"] = str((smoke.parent / shorter["harvest"]).resolve())
    shorter["defaults"]["training"]["tokens"] //= 10
    shorter["evaluation"] |= {"latents_sampled": 8, "max_tokens": 1200}
    manifest = tmp_path / "smoke.yaml"
    manifest.write_text(yaml.safe_dump(shorter, sort_keys=False))
    result = experiment.run(manifest, tmp_path / "results")
    expected, _ = load_experiment(manifest)
    trained = [row for row in result.table if row["role"] == "trained"]
    assert [row["variant"] for row in trained] == [v["name"] for v in expected.variants]
    for row in trained:
        assert 0 < row["fvu"] < 1, row
        assert row["l0"] > 0, row
    assert {row["variant"] for row in result.table if row["role"] == "control"} == {
        v["name"] for v in expected.variants
    }
