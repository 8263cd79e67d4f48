"""The evaluate stage end to end on a tiny random model: one row per variant, finite
metrics, a per-layer SAE scores FC = 1, plots are real PNGs, every HTML link resolves,
text is escaped, and the CLI (evaluate, compare) reports results and one-line errors."""

from __future__ import annotations

import json
import math
import shutil
import threading
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlparse

import matplotlib.image
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.evaluation.results import run_id
from pipeline.manifests.harvest import HarvestManifest
from pipeline.paths import EvaluationPaths, ReportPaths, RunPaths
from pipeline.training.manifest import CoderManifest
from stages import evaluate, harvest, train
from tests.conftest import merge, tiny_manifest_dict
from tests.helpers import QuietHTTPServer

# Three languages and half the documents held out, so that sequence probes have data.
STORE = {
    "text": {"languages": ["en", "fr", "es"]},
    "tokenization": {"num_tokens": 12288, "test_fraction": 0.5},
}
TRAINING = {"tokens": 30 * 128, "batch_size": 128, "checkpoint_every": 50, "lr": 1e-3}
CODERS = {
    # A name with markup: the report must escape it.
    'cross<coder>&"x"': {"kind": "crosscoder", "n_latents": 64, "activation": "topk", "k": 4},
    "fmxcoder": {
        "kind": "fmxcoder",
        "n_latents": 64,
        "activation": "topk",
        "k": 4,
        "encoder_factorization": "shared_basis",
        "decoder_factorization": "shared_basis",
        "rank": 2,
        "masking_probability": 0.3,
    },
    "sae": {"kind": "per_layer_sae", "latents_per_layer": 16, "activation": "topk", "k": 1},
}
SAMPLED = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("evaluate")
    store = harvest.run(
        HarvestManifest.model_validate(merge(tiny_manifest_dict(), STORE)), root / "cache"
    ).path
    manifests = [
        CoderManifest.model_validate(
            {
                "name": name,
                "cache": {"key": store.name, "root": str(store.parent)},
                "coder": coder,
                "training": TRAINING,
                "run": {"runs_root": str(root / "runs"), "progress": False},
            }
        )
        for name, coder in CODERS.items()
    ]
    return [r.run_dir for r in train.run([(m, root) for m in manifests])]


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory) -> Path:
    options = evaluate.EvaluateOptions(
        latents_sampled=SAMPLED, splice_windows=6, masking_tokens=1024, progress=False, device="cpu"
    )
    return evaluate.run(runs, tmp_path_factory.mktemp("report"), options)


def test_one_row_per_variant_with_finite_metrics(report: Path, runs: list[Path]) -> None:
    summary = json.loads(ReportPaths(report).summary.read_text())
    rows = {row["variant"]: row for row in summary["variants"]}
    assert set(rows) == set(CODERS)
    assert {row["run_dir"] for row in rows.values()} == {run_id(r) for r in runs}
    assert all(not Path(row["run_dir"]).is_absolute() for row in rows.values())
    for name, row in rows.items():
        for key in ("mse", "fvu", "l0", "fc", "d_eff", "ce_score", "kl", "purity"):
            assert math.isfinite(row[key]), (name, key, row[key])
        assert 0 < row["fvu"] < 2 and row["l0"] > 0 and row["n_tokens"] == summary["n_eval_tokens"]
        assert 1 <= row["fc"] <= 4 and row["judge_rated"] <= SAMPLED
        assert row["judge"] == "purity" and row["n_alive"] > 0
    assert rows["sae"]["fc"] == pytest.approx(1.0) and rows["sae"]["d_eff"] == pytest.approx(1.0)
    assert rows["sae"]["l0"] == pytest.approx(4.0)  # k = 1 per layer, 4 layers
    assert summary["splice"] == "done"
    assert summary["probe_tasks"]["token"] and summary["probe_tasks"]["sequence"]
    assert any(math.isfinite(row["sequence_f1_k1"] or math.nan) for row in rows.values())
    baselines = {b["variant"] for b in summary["baselines"]}
    assert baselines == {"residual", "sae (best layer)"}

    variants = pq.read_table(ReportPaths(report).table("variants")).to_pylist()
    assert [v["variant"] for v in variants][: len(CODERS)] == list(rows)
    per_layer = pq.read_table(ReportPaths(report).table("per_layer")).to_pylist()
    assert len(per_layer) == 4 * len(CODERS)
    assert all(math.isfinite(r["fvu"]) and math.isfinite(r["ce_score"]) for r in per_layer)
    latents = pq.read_table(ReportPaths(report).table("latents"))
    assert latents.num_rows == 64 * 3
    sampled = pq.read_table(ReportPaths(report).table("sampled")).to_pylist()
    assert len(sampled) == SAMPLED * len(CODERS) and all(s["contexts"] for s in sampled)
    assert any("<<" in c for s in sampled for c in s["contexts"])  # active tokens marked


def test_each_run_keeps_its_own_results(report: Path, runs: list[Path]) -> None:
    for run in runs:
        paths = EvaluationPaths(RunPaths(run).evaluation)
        metrics = json.loads(paths.metrics.read_text())
        assert metrics["run_dir"] == run_id(run) and metrics["report"] == str(report)
        assert pq.read_table(paths.per_layer).num_rows == 4
        assert pq.read_table(paths.latents).num_rows == 64
        assert pq.read_table(paths.probing).num_rows > 0


def test_plots_are_nonempty_pngs(report: Path) -> None:
    for name in ("fvu_per_layer", "neff_hist", "spread", "probing_f1"):
        path = ReportPaths(report).plot(name)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 300, name
        assert np.ptp(image[..., :3]) > 0.5, f"{name} is blank"


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("href", "src") and value:
                self.links.append(value)

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: Path) -> _Links:
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def test_html_links_resolve_and_text_is_escaped(report: Path) -> None:
    index = ReportPaths(report).index
    pages = [index, *sorted((report / "latents").rglob("*.html"))]
    assert len(pages) >= 1 + SAMPLED * len(CODERS)  # the random sample, and top picks
    linked = set()
    for page in pages:
        parsed = _parse(page)
        for link in parsed.links:
            assert not urlparse(link).scheme, f"{page}: external link {link}"
            target = (page.parent / link).resolve()
            assert target.is_file(), f"{page}: broken link {link}"
            linked.add(target)
    assert set(p.resolve() for p in pages[1:]) <= linked  # every latent page is reachable
    html = index.read_text(encoding="utf-8")
    escaped = "cross&lt;coder&gt;&amp;&#34;x&#34;"  # Jinja2 autoescape (markupsafe)
    assert escaped in html and "<coder>" not in html
    assert 'cross<coder>&"x"' in "".join(_parse(index).text)  # and reads back unescaped


def private_copies(runs: list[Path], root: Path) -> list[Path]:
    """Copies of the module's runs: evaluating a run rewrites its ``evaluation/`` (its latest
    evaluation), so a test that evaluates again must not touch the shared ones."""
    copies = []
    for run in runs:
        copy = root / "runs" / run.parent.name / run.name
        shutil.copytree(run, copy)
        copies.append(copy)
    return copies


def test_cli_evaluate_and_compare(runs: list[Path], tmp_path: Path, monkeypatch) -> None:
    runs = private_copies(runs, tmp_path / "copies")
    runner = CliRunner()
    args = ["evaluate", *map(str, runs), "--out", str(tmp_path / "r"), "--no-splice"]
    result = runner.invoke(main, [*args, "--max-tokens", "512", "--latents-sampled", "1"])
    assert result.exit_code == 0, result.output
    table = result.output.split("\n\n")[0].splitlines()[-len(CODERS) - 2 :]
    assert all(any(line.startswith(name) for line in table) for name in CODERS), table
    assert f"report: {tmp_path / 'r' / 'index.html'}\n" in result.output
    summary = json.loads((tmp_path / "r" / "results.json").read_text())
    assert summary["splice"].startswith("skipped") and summary["n_eval_tokens"] == 512
    page = next((tmp_path / "r" / "latents").rglob("*.html")).read_text()
    assert "Skipped: the model was not loaded (--no-splice)" in page  # says why

    result = runner.invoke(main, ["compare", *map(str, runs)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["variant", "kind", "FVU"] and len(lines) == 1 + len(runs)

    missing = runner.invoke(main, ["compare", str(tmp_path)])
    assert missing.exit_code == 1
    assert missing.output == (
        f"Error: {tmp_path}: no evaluation results (run `pipeline evaluate {tmp_path}` first)\n"
    )
    bad = runner.invoke(main, ["evaluate", str(tmp_path)])
    assert bad.exit_code == 1 and bad.output.count("\n") == 1
    assert "neither a run directory, a checkpoint nor a manifest" in bad.output

    monkeypatch.delenv("FMX_JUDGE_BASE_URL", raising=False)
    monkeypatch.delenv("FMX_JUDGE_MODEL", raising=False)
    judge = runner.invoke(main, ["evaluate", str(runs[0]), "--judge", "openai"])
    assert judge.exit_code == 1  # fails before any work, in one line
    assert judge.output == (
        "Error: judge: set FMX_JUDGE_BASE_URL and FMX_JUDGE_MODEL to use the "
        "OpenAI-compatible judge\n"
    )


class _Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that rates every latent 5 and keeps the prompts."""

    prompts: ClassVar[list[str]] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).prompts.append(body["messages"][-1]["content"])
        reply = {"choices": [{"message": {"content": '{"rating": 5, "explanation": "dates"}'}}]}
        payload = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_openai_judge_ratings_reach_the_results(runs, tmp_path, monkeypatch) -> None:
    runs = private_copies(runs[:1], tmp_path / "copies")
    server = QuietHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("FMX_JUDGE_BASE_URL", f"http://127.0.0.1:{server.server_port}/v1")
        monkeypatch.setenv("FMX_JUDGE_MODEL", "fake")
        options = evaluate.EvaluateOptions(
            judge="openai", latents_sampled=2, splice=False, max_tokens=512, progress=False
        )
        report = evaluate.run(runs, tmp_path / "report", options)
    finally:
        server.shutdown()
    (row,) = json.loads(ReportPaths(report).summary.read_text())["variants"]
    assert (row["judge"], row["judge_rated"], row["judge_good"], row["judge_mean"]) == (
        "openai",
        2,
        2,
        5.0,
    )
    pages = list((ReportPaths(report).root / "latents").rglob("*.html"))
    assert len(_Judge.prompts) == len(pages) >= 2  # every page is rated; the table: the sample
    assert all("<<" in p for p in _Judge.prompts)
    sampled = pq.read_table(ReportPaths(report).table("sampled")).to_pylist()
    assert [s["explanation"] for s in sampled] == ["dates", "dates"]


def test_floor_fvu_only_for_a_floored_decoder(report: Path, runs: list[Path]) -> None:
    from pipeline.evaluation import spectrum as sp
    from pipeline.store.reader import ActivationStore

    summary = json.loads(ReportPaths(report).summary.read_text())
    rows = {row["variant"]: row for row in summary["variants"]}
    assert rows["sae"]["floor_fvu"] is None and rows['cross<coder>&"x"']["floor_fvu"] is None
    # fmxcoder: shared_basis rank 2 of 4 layers; its floor on the same held-out tokens
    floor = rows["fmxcoder"]["floor_fvu"]
    assert 0 < floor < rows["fmxcoder"]["fvu"]
    store = ActivationStore(runs[0].parents[2] / "cache" / summary["store"])  # root/runs/key/hash
    acc = sp.MomentAccumulator()
    for x in sp.training_batches(store, [0, 1, 2, 3], True, split="test"):
        acc.update(x)
    assert acc.n == rows["fmxcoder"]["n_tokens"]
    assert floor == pytest.approx(sp.layer_spectrum(acc)[1].floor_fvu, rel=1e-6)
