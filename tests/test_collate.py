"""Tables across experiments (`pipeline collate`), on hand-built results directories whose
answers are known: the trend's ratios and the families' recovery shares are computed here
from the planted numbers, not by the code under test."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.experiment import collate


def _run(variant: str, kind: str, seed: int, latents: int, parameters: int, mse: float,
         f1: float, role: str = "trained") -> dict:  # fmt: skip
    name = f"{variant} s{seed}" if role == "trained" else f"{variant} untrained s{seed}"
    return {
        "variant": name,
        "kind": kind,
        "n_latents": latents,
        "parameters": parameters,
        "l0": 32.0,
        "fvu": mse / 100,
        "mse": mse,
        "fc": 2.0,
        "d_eff": 2.0,
        "judge": "purity",
        "judge_good": 1,
        "judge_rated": 8,
        "dead_fraction": 0.0,
        "token_f1_k5": f1,
        "sequence_f1_k5": f1,
        "protocol": {"variant": variant, "role": role, "seed": seed, "lr": 0.001},
    }


def _results_dir(root: Path, name: str, tokens: int, runs: list[dict], drift: str = "planar",
                 recovery: dict | None = None) -> Path:  # fmt: skip
    path = root / name
    (path / "report").mkdir(parents=True)
    experiment = {"name": name, "defaults": {"training": {"tokens": tokens}}}
    harvest = {"model": {"source": "planted", "planted": {"drift": drift}}}
    (path / "experiment.yaml").write_text(yaml.safe_dump(experiment))
    (path / "harvest.yaml").write_text(yaml.safe_dump(harvest))
    for i, run in enumerate(runs):
        run["run_dir"] = f"cache/run{i}"
    labels = {run["run_dir"]: run.pop("protocol") for run in runs}
    (path / "protocol.json").write_text(json.dumps(labels))
    summary = {"variants": runs, "recovery": recovery or {}}
    (path / "report" / "results.json").write_text(json.dumps(summary))
    return path


def _scale_runs(fmx_mse: list[float], cc_mse: list[float], matched_mse: list[float]) -> list[dict]:
    runs = []
    for seed, (f, c, m) in enumerate(zip(fmx_mse, cc_mse, matched_mse, strict=True)):
        runs += [
            _run("fmxcoder-1k", "fmxcoder", seed, 1024, 2_410_000, f, 0.80),
            _run("crosscoder-1k", "crosscoder", seed, 1024, 11_800_000, c, 0.75),
            _run("crosscoder-matched-params-1k", "crosscoder", seed, 209, 2_420_000, m, 0.70),
            _run("fmxcoder-1k", "fmxcoder", seed, 1024, 2_410_000, 99.0, 0.5, role="control"),
        ]
    return runs


def test_trend_pairs_by_seed_and_matches_width_and_parameters(tmp_path: Path) -> None:
    small = _results_dir(
        tmp_path, "scale-8k", 8192, _scale_runs([2.0, 3.0], [1.0, 2.0], [4.0, 6.0])
    )
    large = _results_dir(
        tmp_path, "scale-32k", 32768, _scale_runs([1.0, 1.0], [1.0, 2.0], [2.0, 2.0])
    )
    rows = collate.scale_trend([collate.load_experiment(p) for p in (large, small)])
    got = {(r["tokens"], r["comparison"]): r for r in rows}
    assert sorted(got) == [
        (8192, "same latents"), (8192, "same parameters"),
        (32768, "same latents"), (32768, "same parameters"),
    ]  # fmt: skip
    # per-seed ratios 2/1, 3/2 -> mean 1.75, sd of (2, 1.5)
    r = got[(8192, "same latents")]
    assert r["mse_ratio"] == pytest.approx(1.75)
    assert r["mse_ratio_sd"] == pytest.approx(math.sqrt(0.125))
    assert r["probe_f1_points"] == pytest.approx(5.0)
    assert r["baseline"] == "crosscoder-1k" and r["seeds"] == 2
    assert got[(32768, "same parameters")]["mse_ratio"] == pytest.approx(0.5)
    assert got[(32768, "same parameters")]["probe_f1_points"] == pytest.approx(10.0)
    assert [r["tokens"] for r in rows] == sorted(r["tokens"] for r in rows)


def test_trend_command_writes_table_json_and_plot(tmp_path: Path) -> None:
    dirs = [
        _results_dir(tmp_path, f"scale-{t}", t, _scale_runs([2.0], [1.0], [3.0]))
        for t in (8192, 32768)
    ]
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["collate", "trend", *map(str, dirs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"trend.md", "trend.json", "trend.png"}
    rows = json.loads((out / "trend.json").read_text())
    assert {r["mse_ratio"] for r in rows} == {2.0, 2 / 3}
    assert (out / "trend.png").read_bytes()[:4] == b"\x89PNG"


def test_collate_names_a_missing_file(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(
        main, ["collate", "trend", str(tmp_path / "empty"), "--out", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert "experiment.yaml: missing" in result.output and "Traceback" not in result.output


def _recovery(spanning: float, single: float) -> dict:
    by_kind = {"spanning": {"recovered": spanning}, "single": {"recovered": single},
               "cooccurring": {"recovered": 0.0}}  # fmt: skip
    return {
        "summary": {"mmcs": 0.9, "recovered": (spanning + single) / 2, "by_kind": by_kind},
        "calibration": {},
    }


def test_families_put_each_drift_family_in_its_own_column(tmp_path: Path) -> None:
    dirs = []
    for drift, spanning in (("planar", (1.0,)), ("random_walk", (0.5, 0.7))):
        seeds = range(len(spanning))
        runs = [_run("crosscoder", "crosscoder", s, 256, 1000, 1.0, 0.8) for s in seeds]
        recovery = {f"crosscoder s{s}": _recovery(spanning[s], 1.0) for s in seeds}
        dirs.append(_results_dir(tmp_path, f"planted-{drift}", 1, runs, drift, recovery))
    rows = collate.family_recovery([collate.load_experiment(d) for d in dirs])
    by_family = {r["family"]: r for r in rows}
    assert by_family["planar"]["recovered_spanning"] == pytest.approx(1.0)
    assert by_family["random_walk"]["recovered_spanning"] == pytest.approx(0.6)
    assert by_family["random_walk"]["recovered_spanning_sd"] == pytest.approx(math.sqrt(0.02))
    markdown = collate.render_families(rows)
    assert "| variant | planar | random_walk |" in markdown
    assert "| crosscoder | 1.00 | 0.60 ± 0.14 |" in markdown
    one_seed = collate.family_recovery([collate.load_experiment(d) for d in dirs[:1]])
    assert math.isnan(one_seed[0]["recovered_spanning_sd"])  # one seed has no spread
