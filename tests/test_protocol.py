"""The fair-comparison protocol: validation split, training logs, controls, seeds, lr choice."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.coders import build_coder, coder_config_from_dict
from pipeline.coders.base import layer_fvu, resolve_dead_after_tokens
from pipeline.evaluation.reconstruction import ReconstructionAccumulator
from pipeline.experiment.manifest import ExperimentManifest, variant_manifests
from pipeline.experiment.protocol import (
    beyond_edge,
    choose_lr,
    cost_line,
    lr_sweep_runs,
    protocol_runs,
)
from pipeline.experiment.results_table import protocol_table, render_markdown
from pipeline.store.reader import ActivationStore
from pipeline.training.loader import split_rows, validation_documents
from pipeline.training.manifest import CoderManifest
from stages import train
from tests.helpers import harvest_tiny

CROSSCODER = {"kind": "crosscoder", "n_latents": 64, "activation": "topk", "k": 4}


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    harvest_tiny(root)
    return root


@pytest.fixture(scope="module")
def store(cache_root) -> ActivationStore:
    return ActivationStore(next(p for p in cache_root.iterdir() if p.is_dir()))


def _docs(store: ActivationStore, rows: np.ndarray) -> set[int]:
    return set(store.tokens(columns=["doc_id"])["doc_id"].to_numpy()[rows].tolist())


def test_validation_split_is_disjoint_deterministic_and_leaves_test_alone(store):
    train_all = split_rows(store, "train")
    test = split_rows(store, "test")
    train = split_rows(store, "train", validation_fraction=0.1)
    val = split_rows(store, "validation", validation_fraction=0.1)
    assert val.size and train.size
    assert not _docs(store, train) & _docs(store, val)
    assert not _docs(store, val) & _docs(store, test)
    assert np.array_equal(np.sort(np.concatenate([train, val])), train_all)
    assert np.array_equal(split_rows(store, "test", validation_fraction=0.1), test)
    assert np.array_equal(split_rows(store, "validation", validation_fraction=0.1), val)
    assert split_rows(store, "validation").size == 0  # no fraction: no validation split


def test_validation_documents_hold_out_a_stable_share():
    ids = np.arange(1000)
    held = validation_documents(ids, 0.1)
    assert held.sum() == 100
    assert np.array_equal(validation_documents(ids[::-1], 0.1), held[::-1])  # by id, not order
    assert validation_documents(np.array([3, 7]), 0.1).sum() == 1  # at least one, never all
    assert validation_documents(ids, 0.0).sum() == 0
    with pytest.raises(ValueError, match="validation_fraction"):
        validation_documents(ids, 1.0)


def test_training_fvu_is_evaluates_definition():
    """Per-layer FVU (variance around each layer's mean), averaged over layers: the layers
    are scaled very differently so a pooled ratio would disagree."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 8, generator=gen) * torch.tensor([1.0, 10.0, 0.1])[None, :, None]
    x = x + 5.0  # a large mean: variance around zero would be wrong
    x_hat = x + 0.3 * torch.randn(64, 3, 8, generator=gen)
    scale = torch.tensor([2.0, 0.5, 3.0])
    acc = ReconstructionAccumulator(scale)
    acc.update(x, x_hat)
    assert layer_fvu(x, x_hat).item() == pytest.approx(acc.result().fvu_mean, rel=1e-5)
    pooled = ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    assert abs(pooled - acc.result().fvu_mean) > 0.1  # the old definition differed here

    config = coder_config_from_dict({**CROSSCODER, "n_layers": 3, "d_model": 8})
    coder = build_coder(config)
    out = coder.training_loss(x, 0, 10)
    assert isinstance(out.terms["fvu"], torch.Tensor)  # no host sync in the hot path
    acc = ReconstructionAccumulator(scale)
    with torch.no_grad():
        acc.update(x, coder(x))
    assert out.floats()["fvu"] == pytest.approx(acc.result().fvu_mean, rel=1e-4)


def test_dead_after_tokens_scales_with_the_run():
    assert resolve_dead_after_tokens(300_000, 512) == 30_000
    assert resolve_dead_after_tokens(10**10, 4096) == 10_000_000
    assert resolve_dead_after_tokens(1_000, 512) == 512


def _manifest(cache_root: Path, runs_root: Path, name: str, **training) -> CoderManifest:
    key = next(p.name for p in cache_root.iterdir() if p.is_dir())
    return CoderManifest.model_validate(
        {
            "name": name,
            "cache": {"key": key, "root": str(cache_root)},
            "coder": CROSSCODER,
            "training": {"batch_size": 64, "log_every": 5, **training},
            "run": {"runs_root": str(runs_root), "progress": False},
        }
    )


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_val_fvu_is_logged_every_eval_every_and_dead_window_recorded(cache_root, tmp_path):
    manifest = _manifest(cache_root, tmp_path, "val", tokens=64 * 9, eval_every=4)
    (result,) = train.run([(manifest, tmp_path)])
    records = _records(result.run_dir)
    val_steps = [r["step"] for r in records if "val_fvu" in r]
    assert val_steps == [4, 8, 9]
    assert all(0 < r["val_fvu"] < 2 and r["val_l0"] == 4 for r in records if "val_fvu" in r)
    assert [r["step"] for r in records if "fvu" in r] == [4, 5, 8, 9]
    resolved = json.loads((result.run_dir / "coder_manifest.json").read_text())["coder"]
    assert resolved["dead_after_tokens"] == resolve_dead_after_tokens(64 * 9, 64)
    assert any(r["auxk"] > 0 for r in records if "auxk" in r)  # AuxK acts in a short run


def test_zero_step_control_saves_the_initialised_coder(cache_root, tmp_path):
    manifest = _manifest(cache_root, tmp_path, "control", tokens=0)
    (result,) = train.run([(manifest, tmp_path)])
    assert result.steps == 0
    from pipeline.training.checkpoint import load_coder

    saved = load_coder(result.run_dir / "final")
    config = coder_config_from_dict({**CROSSCODER, "n_layers": 4, "d_model": 64})
    fresh = build_coder(config)
    for name, value in fresh.state_dict().items():
        if name != "tokens_since_fired":
            assert torch.equal(saved.state_dict()[name], value), name
    (record,) = _records(result.run_dir)
    assert record["step"] == 0 and "val_fvu" in record
    (again,) = train.run([(manifest, tmp_path)])
    assert again.skipped


def _row(variant: str, role: str, seed: int, fvu: float, fc: float, kind="crosscoder") -> dict:
    return {
        "variant": f"{variant} {role} s{seed}",
        "kind": kind,
        "n_latents": 64,
        "parameters": 1000,
        "l0": 4.0,
        "fvu": fvu,
        "mse": fvu / 10,
        "fc": fc,
        "d_eff": 2.0,
        "judge": "purity",
        "judge_good": 1,
        "judge_rated": 4,
        "dead_fraction": 0.0,
        "token_f1_k5": 0.5,
        "sequence_f1_k5": 0.5,
        "run_dir": f"/runs/{variant}-{role}-{seed}",
        "protocol": {"variant": variant, "role": role, "seed": seed, "lr": 0.001},
    }


def test_seeds_give_mean_sd_and_controls_mark_uninformative_metrics():
    summary = {
        "variants": [
            _row("cc", "trained", 0, 0.30, 4.0),
            _row("cc", "trained", 1, 0.34, 6.0),
            _row("cc", "control", 0, 1.00, 5.0),
            _row("cc", "control", 1, 1.00, 5.2),
        ],
        "baselines": [
            {"variant": "residual", "kind": "baseline", "token_f1_k5": 0.9, "sequence_f1_k5": 0.7}
        ],
    }
    table = protocol_table(summary)
    trained, control, residual = table
    assert (trained["role"], control["role"], residual["variant"]) == (
        "trained",
        "control",
        "residual",
    )
    assert trained["seeds"] == 2
    assert trained["fvu"] == pytest.approx(0.32)
    assert trained["fvu_sd"] == pytest.approx(np.std([0.30, 0.34], ddof=1))
    assert "fvu" not in trained["not_informative"]  # 0.32 ± 0.03 vs 1.00 ± 0
    assert "fc_n_eff" in trained["not_informative"]  # 5.0 ± 1.4 vs 5.1 ± 0.1
    assert "probe_f1" in trained["not_informative"]  # equal to the control
    assert residual["probe_f1"] == pytest.approx(0.8)
    text = render_markdown(table, summary)
    assert "0.320 ± 0.028" in text
    assert "5.00 ± 1.41 †" in text
    assert "† not informative" in text


def test_lr_choice_is_the_lowest_validation_fvu():
    points = [
        {"lr": 1e-4, "val_fvu": 0.40},
        {"lr": 3e-4, "val_fvu": 0.25},
        {"lr": 1e-3, "val_fvu": math.nan},
        {"lr": 3e-3, "val_fvu": None},
        {"lr": 1e-2, "val_fvu": 0.31},
    ]
    assert choose_lr(points) == 3e-4
    with pytest.raises(ValueError, match="no run logged a finite val_fvu"):
        choose_lr([{"lr": 1e-3, "val_fvu": None}])


def test_a_best_lr_at_the_grid_edge_asks_for_one_step_further():
    grid = [
        {"lr": 1e-3, "val_fvu": 0.3},
        {"lr": 3e-3, "val_fvu": 0.4},
        {"lr": 1e-2, "val_fvu": 0.5},
    ]
    assert beyond_edge(grid) == pytest.approx(1e-3 / 3)
    grid[2]["val_fvu"] = 0.1
    assert beyond_edge(grid) == pytest.approx(1e-2 * 10 / 3)
    grid[1]["val_fvu"] = 0.05
    assert beyond_edge(grid) is None  # interior: the grid brackets the optimum
    assert beyond_edge([{"lr": 1e-3, "val_fvu": 0.3}]) is None


def test_the_sweep_extends_past_an_edge_until_bracketed_or_out_of_steps(monkeypatch, tmp_path):
    """Validation FVU is lowest at lr 1e-4, below a [1e-3, 3e-3] grid: the sweep steps down
    by the grid's ratio, one run per round, and stops once the optimum is bracketed."""
    from stages import experiment as stage

    def fake_train(planned, device):
        return {i: tmp_path / "runs" / f"{p.variant}-{p.lr:.6g}" for i, p in enumerate(planned)}

    def fake_validation(run_dir):
        lr = float(run_dir.name.rsplit("-", 1)[1])
        return {"step": 1, "val_fvu": abs(math.log10(lr) + 4) + 0.1, "val_l0": 4.0}

    monkeypatch.setattr(stage, "_train", fake_train)
    monkeypatch.setattr(stage, "final_validation", fake_validation)

    def sweep(extend: int) -> dict:
        experiment = ExperimentManifest.model_validate(
            {
                "name": "edge",
                "harvest": "h.yaml",
                "defaults": {"training": {"tokens": 1024, "batch_size": 256}},
                "variants": [{"name": "cc", "coder": CROSSCODER}],
                "lr_sweep": {"lrs": [1e-3, 3e-3], "tokens": 512, "extend_at_edges": extend},
            }
        )
        variants = variant_manifests(experiment, tmp_path, "edge.yaml")
        return stage._lr_sweep(experiment, lr_sweep_runs(experiment, variants, "e"), None)["cc"]

    found = sweep(extend=4)
    tried = [p["lr"] for p in found["points"]]
    assert tried == pytest.approx([1e-3 / 27, 1e-3 / 9, 1e-3 / 3, 1e-3, 3e-3])
    assert found["chosen_lr"] == pytest.approx(1e-3 / 9) and not found["at_edge"]
    capped = sweep(extend=1)
    assert capped["chosen_lr"] == pytest.approx(1e-3 / 3) and capped["at_edge"]
    assert not sweep(extend=0)["points"][0]["lr"] < 1e-3


def test_protocol_plans_every_run_and_counts_the_cost(tmp_path):
    experiment = ExperimentManifest.model_validate(
        {
            "name": "plan",
            "harvest": "h.yaml",
            "defaults": {"training": {"tokens": 1024, "batch_size": 256}},
            "variants": [{"name": "cc", "coder": CROSSCODER}],
            "seeds": [0, 1, 2],
            "lr_sweep": {"lrs": [1e-3, 3e-3], "tokens": 512},
            "sparsity_sweep": {"k": [2, 4, 8]},
        }
    )
    variants = variant_manifests(experiment, tmp_path, "plan.yaml")
    sweep = lr_sweep_runs(experiment, variants, "plan.yaml")
    assert [(r.lr, r.manifest.training.tokens, r.seed) for r in sweep] == [
        (1e-3, 512, 0),
        (3e-3, 512, 0),
    ]
    runs = protocol_runs(experiment, variants, "plan.yaml", {"cc": 3e-3})
    trained = [r for r in runs if r.role == "trained"]
    assert [(r.seed, r.manifest.coder["seed"], r.manifest.training.seed) for r in trained] == [
        (0, 0, 0),
        (1, 1, 1),
        (2, 2, 2),
    ]
    assert {r.lr for r in runs} == {3e-3}
    assert [r.manifest.training.tokens for r in runs if r.role == "control"] == [0, 0, 0]
    assert [r.k for r in runs if r.role == "sparsity"] == [2, 8]  # k=4 is the trained run
    assert len({r.manifest.run_hash() for r in runs + sweep}) == len(runs + sweep)
    line = cost_line("plan", sweep + runs)
    assert "10 runs (2 lr-sweep, 3 trained, 3 control, 2 sparsity)" in line
    assert "24 training steps" in line  # 2 x 2 + 3 x 4 + 3 x 0 + 2 x 4


def test_logged_terms_convert_once_and_keep_plain_numbers():
    from pipeline.coders.base import terms_to_floats

    terms = {"fvu": torch.tensor(0.25), "lr": 1e-3, "l0": torch.tensor([4.0])}
    assert terms_to_floats(terms) == {"fvu": 0.25, "lr": 1e-3, "l0": 4.0}
    assert terms_to_floats({"lr": 0.5}) == {"lr": 0.5}


def test_recovery_table_folds_seeds_per_variant_and_role() -> None:
    from pipeline.experiment.results_table import recovery_table, render_recovery

    def entry(mmcs: float, spanning: float) -> dict:
        kinds = {"single": {"recovered": 1.0}, "spanning": {"recovered": spanning}}
        summary = {"mmcs": mmcs, "recovered": spanning, "by_kind": kinds}
        return {"summary": summary, "calibration": {"fc": {"spearman": 0.9}}}

    summary = {
        "variants": [
            {"variant": f"cc s{s}", "protocol": {"variant": "cc", "role": role, "seed": s}}
            for s, role in ((0, "trained"), (1, "trained"))
        ]
        + [{"variant": "cc untrained s0", "protocol": {"variant": "cc", "role": "control"}}],
        "recovery": {
            "cc s0": entry(0.9, 0.8),
            "cc s1": entry(0.8, 0.6),
            "cc untrained s0": entry(0.1, 0.0),
        },
    }
    trained, control = recovery_table(summary)
    assert (trained["role"], trained["seeds"], control["role"]) == ("trained", 2, "control")
    assert trained["mmcs"] == pytest.approx(0.85) and trained["recovered_spanning_sd"] > 0
    text = render_recovery([trained, control])
    assert "| cc | trained | 0.850 ± 0.071 |" in text and "ρ(fc, span)" in text
    assert render_recovery([]) == ""


def _with_interval(row: dict, **bounds: list[float]) -> dict:
    record = {"resamples": 200, "level": 0.95, "n_docs": 40, "probe_k": 5}
    return row | {"bootstrap": record | bounds | {"probe_topk_changed": 0.25}}


def test_one_seed_marks_a_difference_inside_the_bootstrap_interval():
    """One seed has no sd: the † and ≈ rules fall back on the bootstrap interval, so a
    difference inside the noise is flagged where the seed spread alone would miss it."""
    fmx = _row("fmx", "trained", 0, 0.40, 3.0, kind="fmxcoder")
    fmx |= {"token_f1_k5": 0.66, "sequence_f1_k5": 0.66}
    summary = {
        "variants": [
            _with_interval(
                _row("cc", "trained", 0, 0.30, 4.0), probe_f1=[0.50, 0.70], fvu=[0.29, 0.31]
            ),
            _with_interval(fmx, probe_f1=[0.58, 0.74], fvu=[0.39, 0.41]),
            _with_interval(_row("fmx", "control", 0, 1.0, 3.1, kind="fmxcoder"), fc=[2.0, 4.0]),
        ]
    }
    trained_fmx = protocol_table(summary)[1]
    assert trained_fmx["seeds"] == 1 and trained_fmx["probe_f1_sd"] == 0.0
    assert "probe_f1" in trained_fmx["within_noise_of_crosscoder"]  # 0.66 vs 0.50, CI ±0.1, ±0.08
    assert "fvu" not in trained_fmx["within_noise_of_crosscoder"]  # 0.40 vs 0.30, CI ±0.01
    assert "fc_n_eff" in trained_fmx["not_informative"]  # 3.0 vs 3.1, control CI ±1
    assert "fvu" not in trained_fmx["not_informative"]
    without = protocol_table({"variants": [{k: v for k, v in r.items() if k != "bootstrap"}
                                           for r in summary["variants"]]})  # fmt: skip
    assert "probe_f1" not in without[1]["within_noise_of_crosscoder"]  # sd 0: nothing flagged
    assert "fc_n_eff" not in without[1]["not_informative"]
    text = render_markdown(protocol_table(summary), summary)
    assert "0.660 [0.580, 0.740] ≈" in text
    assert "3.00 † " in text or "3.00 †" in text
    assert "200 resamples of the 40 held-out documents" in text
    assert "fmx 25%" in text and "not evidence" in text
