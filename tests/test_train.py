"""Training from a cache: resume equals uninterrupted, one cache serves many variants."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from pipeline.cli import main
from pipeline.training.manifest import CoderManifest
from stages import train
from tests.helpers import harvest_tiny

KILL_SCRIPT = Path(__file__).with_name("slow_train.py")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    harvest_tiny(root)
    return root


FMXCODER = {
    "kind": "fmxcoder",
    "n_latents": 96,
    "activation": "topk",
    "k": 6,
    "encoder_factorization": "shared_basis",
    "decoder_factorization": "shared_basis",
    "rank": 2,
    "masking_probability": 0.3,
    "collapse_coefficient": 0.1,
}
CROSSCODER = {"kind": "crosscoder", "n_latents": 96, "activation": "topk", "k": 6}


def coder_manifest(cache_root: Path, runs_root: Path, spec: dict = FMXCODER) -> CoderManifest:
    key = next(p.name for p in cache_root.iterdir() if p.is_dir())
    return CoderManifest.model_validate(
        {
            "name": f"test-{spec['kind']}",
            "cache": {"key": key, "root": str(cache_root)},
            "coder": spec,
            "training": {"tokens": 12800, "batch_size": 128, "checkpoint_every": 25},
            "run": {"runs_root": str(runs_root), "progress": False},
        }
    )


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "coder.safetensors")


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_killed_run_resumes_to_identical_weights(cache_root, tmp_path):
    manifest = coder_manifest(cache_root, tmp_path / "clean")
    (reference,) = train.run([(manifest, tmp_path)])

    killed = coder_manifest(cache_root, tmp_path / "killed")
    manifest_file = tmp_path / "killed.json"
    manifest_file.write_text(killed.model_dump_json())
    process = subprocess.Popen(
        [sys.executable, str(KILL_SCRIPT), str(manifest_file)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    run_root = tmp_path / "killed"
    deadline = time.time() + 120
    while time.time() < deadline and not list(run_root.rglob("checkpoint-000000050")):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert list(run_root.rglob("checkpoint-*")), "the run was killed before any checkpoint"
    assert not list(run_root.rglob("final")), "the run finished before it was killed"

    (resumed,) = train.run([(killed, tmp_path)])
    assert resumed.steps == reference.steps == 100
    expected, actual = final_weights(reference.run_dir), final_weights(resumed.run_dir)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    log, expected_log = read_log(resumed.run_dir), read_log(reference.run_dir)
    assert [r["step"] for r in log] == [r["step"] for r in expected_log], "steps lost or repeated"
    assert log == expected_log


def read_log(run_dir: Path) -> list[dict]:
    """The metric log without wall-clock rates, which differ between runs."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "tokens_per_second"} for row in rows]


def test_variants_share_one_cache_and_never_harvest(cache_root, tmp_path, monkeypatch):
    import stages.harvest

    def no_harvest(*args, **kwargs):
        raise AssertionError("training must never harvest")

    monkeypatch.setattr(stages.harvest, "run", no_harvest)
    monkeypatch.setattr(stages.harvest, "load_model", no_harvest)
    before = tree_digest(cache_root)
    variants = [
        coder_manifest(cache_root, tmp_path, CROSSCODER),
        coder_manifest(cache_root, tmp_path),
        coder_manifest(
            cache_root, tmp_path, {**FMXCODER, "masking_probability": 0, "collapse_coefficient": 0}
        ),
    ]
    results = train.run([(m, tmp_path) for m in variants])
    assert len({r.run_dir for r in results}) == 3
    assert all(r.run_dir.parent.name == results[0].run_dir.parent.name for r in results)
    assert tree_digest(cache_root) == before, "training wrote into the store"
    again = train.run([(m, tmp_path) for m in variants])
    assert all(r.skipped for r in again)


def test_missing_cache_names_the_harvest_command(tmp_path):
    harvest_manifest = tmp_path / "h.yaml"
    harvest_manifest.write_text(
        "model: {source: random}\nrun: {cache_root: " + str(tmp_path) + "}\n"
    )
    coder = tmp_path / "c.yaml"
    coder.write_text(
        "name: x\ncache: {harvest_manifest: h.yaml}\n"
        "coder: {kind: crosscoder, n_latents: 8, activation: topk, k: 2}\n"
    )
    result = CliRunner().invoke(main, ["train", str(coder)])
    assert result.exit_code == 1
    assert f"run `pipeline harvest {harvest_manifest}`" in result.output
    assert "Traceback" not in result.output


def test_bad_coder_section_names_the_field(cache_root, tmp_path):
    key = next(p.name for p in cache_root.iterdir() if p.is_dir())
    coder = tmp_path / "c.yaml"
    coder.write_text(
        f"name: x\ncache: {{key: {key}, root: {cache_root}}}\n"
        "coder: {kind: crosscoder, n_latents: 8, activation: topk, k: 99}\n"
    )
    result = CliRunner().invoke(main, ["train", str(coder)])
    assert result.exit_code == 1
    assert "field 'coder." in result.output


def test_stream_strata_beyond_the_batch_is_a_one_line_error(cache_root, tmp_path):
    key = next(p.name for p in cache_root.iterdir() if p.is_dir())
    coder = tmp_path / "c.yaml"
    coder.write_text(
        f"name: x\ncache: {{key: {key}, root: {cache_root}}}\n"
        "coder: {kind: crosscoder, n_latents: 8, activation: topk, k: 2}\n"
        "training: {tokens: 64, batch_size: 2}\n"
        f"run: {{loader_mode: stream, stream_strata: 3, runs_root: {tmp_path / 'runs'}}}\n"
    )
    result = CliRunner().invoke(main, ["train", str(coder)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert errors == [
        "Error: run.stream_strata: 3 strata need a batch of at least that many rows "
        "(training.batch_size is 2)"
    ], result.output
