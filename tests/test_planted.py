"""Planted-truth caches: the generator, its cache key, and harvest -> train -> evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.evaluation.trajectories import Trajectories, trajectory_stats
from pipeline.harvest.cache_key import cache_key
from pipeline.harvest.planted import (
    KINDS,
    PlantedGenerator,
    magnitudes,
    planted_features,
    planted_windows,
    zipf_weights,
)
from pipeline.manifests.harvest import HarvestManifest, PlantedSpec
from pipeline.manifests.io import ManifestError, validate
from pipeline.store.reader import ActivationStore
from stages import experiment, harvest

TINY = {
    "n_layers": 4,
    "d_model": 16,
    "n_single": 8,
    "n_spanning": 6,
    "n_groups": 2,
    "fire_probability": 0.05,
}


def _manifest(**planted) -> HarvestManifest:
    return HarvestManifest.model_validate(
        {
            "model": {"source": "planted", "planted": {**TINY, **planted}},
            "tokenization": {"context_length": 32, "num_tokens": 2048},
            "storage": {"chunk_tokens": 512},
            "run": {"progress": False},
        }
    )


def test_features_have_the_promised_structure() -> None:
    spec = PlantedSpec(**TINY, drift="planar", drift_degrees=90)
    f = planted_features(spec)
    assert f.directions.shape == (8 + 6 + 2 * 2, 4, 16)
    on = np.linalg.norm(f.directions, axis=2) > 0
    assert (on.sum(1) == f.span).all()
    for i in range(f.n_features):  # contiguous spans starting at `start`
        assert on[i, f.start[i] : f.start[i] + f.span[i]].all()
    spanning = f.kind == KINDS.index("spanning")
    assert (f.span[spanning] >= 2).all() and (f.span[~spanning] == 1).all()
    i = int(np.flatnonzero(spanning)[0])  # 90 degrees of drift: first and last orthogonal
    first, last = f.directions[i, f.start[i]], f.directions[i, f.start[i] + f.span[i] - 1]
    assert abs(first @ last) < 1e-9
    grouped = f.kind == KINDS.index("cooccurring")
    assert (f.group[grouped] >= 0).all() and (f.group[~grouped] == -1).all()


def _spanning(drift: str, **over) -> tuple[np.ndarray, Trajectories]:
    """The spanning features of a 10-layer spec that span every layer, and their statistics."""
    spec = PlantedSpec(
        n_layers=10, d_model=64, n_single=0, n_spanning=400, n_groups=0, drift=drift, **over
    )
    f = planted_features(spec)
    full = f.directions[f.span == 10]
    return full, trajectory_stats(full)


def test_planar_drift_is_rank_two_with_the_promised_end_to_end_angle() -> None:
    _, t = _spanning("planar", drift_degrees=72)
    assert np.allclose(t.top[:, 1], 1.0) and (t.top[:, 0] < 0.999).all()
    assert np.allclose(t.first_last_cos, np.cos(np.deg2rad(72)))
    assert np.allclose(t.adjacent_cos, np.cos(np.deg2rad(8)))


def test_random_walk_has_its_adjacent_cosine_and_decays_geometrically() -> None:
    _, t = _spanning("random_walk", adjacent_cosine=0.8)
    assert np.allclose(t.adjacent_cos, 0.8)
    # orthogonal steps in d = 64 >> 10 layers: cos(layer 0, layer 9) ~ 0.8 ** 9, a high rank
    assert abs(np.median(t.first_last_cos) - 0.8**9) < 0.05
    assert np.median(t.top[:, 1]) < 0.9 and np.median(t.top[:, 2]) < 0.95
    assert (t.carry == 10).all()  # the magnitude profile (0.5..1.5) stays above the ratio


def test_independent_drift_puts_every_pair_of_layers_at_the_cosine() -> None:
    w, t = _spanning("independent", adjacent_cosine=0.6)
    unit = w / np.linalg.norm(w, axis=2, keepdims=True)
    cos = np.einsum("fld,fkd->flk", unit, unit)
    off = ~np.eye(10, dtype=bool)
    assert np.allclose(cos[:, off], 0.6)
    # one shared direction carries cos of the energy plus (1 - cos)/L of the rest: rank is high
    assert np.median(t.top[:, 0]) == pytest.approx(0.6 + 0.4 / 10, abs=0.05)


def test_reshape_turns_once_and_is_rank_two() -> None:
    w, t = _spanning("reshape", drift_degrees=90)
    assert np.allclose(t.top[:, 1], 1.0)
    unit = w / np.linalg.norm(w, axis=2, keepdims=True)
    adjacent = np.einsum("fld,fld->fl", unit[:, :-1], unit[:, 1:])
    assert ((np.abs(adjacent - 1) < 1e-9).sum(1) == 8).all()  # every step but one is flat
    assert (np.abs(adjacent).min(1) < 1e-9).all()  # and that one turns 90 degrees
    assert np.allclose(t.first_last_cos, 0.0)


def test_families_share_spans_profiles_and_first_directions() -> None:
    a = planted_features(PlantedSpec(**TINY, drift="planar"))
    b = planted_features(PlantedSpec(**TINY, drift="random_walk"))
    assert (a.span == b.span).all() and (a.start == b.start).all() and (a.topic == b.topic).all()
    first = np.arange(a.n_features), a.start
    assert np.allclose(a.directions[first], b.directions[first])


def test_independent_drift_needs_room_for_its_perturbations() -> None:
    with pytest.raises(ManifestError, match="d_model"):
        validate(
            HarvestManifest,
            {"model": {"source": "planted", "planted": {"d_model": 6, "drift": "independent"}}},
            "h",
        )


def test_firing_rates_are_zipf_and_magnitudes_heavy_tailed_with_the_set_means() -> None:
    spec = PlantedSpec(zipf_exponent=1.0, magnitude_sigma=1.5, magnitude_mean=2.0)
    w = zipf_weights(200, spec)
    assert w.mean() == pytest.approx(1.0)
    ranked = np.sort(w)[::-1]
    assert ranked[0] / ranked[9] == pytest.approx(10.0)  # rank 1 vs rank 10 at exponent 1
    assert np.allclose(zipf_weights(200, PlantedSpec(zipf_exponent=0.0)), 1.0)
    size = magnitudes(np.random.default_rng(0), (400_000,), spec)
    assert size.mean() == pytest.approx(2.0, rel=0.05)
    assert np.median(size) == pytest.approx(2.0 * np.exp(-(1.5**2) / 2), rel=0.05)
    expo = magnitudes(np.random.default_rng(0), (400_000,), PlantedSpec(magnitude_sigma=0.0))
    assert np.quantile(size, 0.999) > 2 * np.quantile(expo, 0.999)  # the heavier tail


def test_group_members_fire_together_on_distinct_layers() -> None:
    manifest = _manifest()
    gen = PlantedGenerator(
        manifest, planted_windows(manifest.model.planted_spec, manifest.tokenization)
    )
    codes = gen.codes(0, 2048, 0)
    f = gen.features
    for g in range(2):
        members = np.flatnonzero(f.group == g)
        fired = codes[:, members] > 0
        assert fired.any() and (fired == fired[:, :1]).all()
        assert np.unique(f.start[members]).size == members.size
    special = gen.special
    assert (codes[special] == 0).all()


def test_topic_shifts_which_features_fire() -> None:
    manifest = _manifest(topic_boost=8.0, n_topics=2)
    spec = manifest.model.planted_spec
    gen = PlantedGenerator(manifest, planted_windows(spec, manifest.tokenization))
    fired = gen.codes(0, 2048, 0) > 0
    preferred = gen.features.topic[None, :] == gen.row_topic[:, None]
    real = gen.row_topic >= 0
    assert fired[real][preferred[real]].mean() > 3 * fired[real][~preferred[real]].mean()


def test_key_changes_with_every_planted_field_and_ignores_defaults_written_out() -> None:
    base = cache_key(_manifest())
    assert cache_key(_manifest(**{"drift_degrees": 60.0})) == base  # the default, written out
    changed = {
        "seed": 1,
        "n_layers": 5,
        "d_model": 8,
        "n_single": 9,
        "n_spanning": 5,
        "max_span": 3,
        "drift_degrees": 10.0,
        "n_groups": 1,
        "group_size": 3,
        "fire_probability": 0.1,
        "magnitude_mean": 2.0,
        "noise_std": 0.5,
        "n_topics": 3,
        "topic_boost": 2.0,
        "doc_tokens": 10,
        "vocab_size": 7,
        "languages": ["en", "fr"],
        "drift": "planar",
        "adjacent_cosine": 0.5,
        "zipf_exponent": 0.0,
        "magnitude_sigma": 0.0,
    }
    assert set(changed) == set(PlantedSpec.model_fields)
    keys = {cache_key(_manifest(**{field: value})) for field, value in changed.items()}
    assert base not in keys and len(keys) == len(changed)


def test_bad_planted_fields_are_named() -> None:
    with pytest.raises(ManifestError, match="max_span"):
        validate(HarvestManifest, {"model": {"source": "planted", "planted": {"max_span": 9}}}, "h")
    with pytest.raises(ManifestError, match=r"model\.planted is only used"):
        validate(HarvestManifest, {"model": {"source": "random", "planted": {}}}, "h")


def test_harvest_is_deterministic_and_a_normal_store(tmp_path: Path) -> None:
    manifest = _manifest()
    first = harvest.run(manifest, tmp_path / "a")
    second = harvest.run(manifest, tmp_path / "b")
    assert first.key == second.key
    a, b = ActivationStore(first.path), ActivationStore(second.path)
    assert a.hook_names == [f"blocks.{i}.hook_resid_post" for i in range(4)]
    for j in range(4):
        assert np.array_equal(a.arrays[j][:], b.arrays[j][:])
    assert set(a.documents().column_names) >= {"doc_id", "title", "language", "topic", "split"}
    assert set(a.tokens().column_names) == {
        "token_id",
        "doc_id",
        "position",
        "token_text",
        "is_special",
    }
    a.verify()


def test_planted_experiment_end_to_end(monkeypatch, tmp_path: Path) -> None:
    """Harvest, train a coder briefly, evaluate: recovery and calibration are written."""
    monkeypatch.setenv("FMX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FMX_RUNS_DIR", str(tmp_path / "runs"))
    (tmp_path / "h.yaml").write_text(json.dumps(_manifest().model_dump(mode="json")))
    (tmp_path / "e.yaml").write_text(
        json.dumps(
            {
                "name": "planted-tiny",
                "harvest": "h.yaml",
                "defaults": {
                    "training": {"tokens": 4096, "batch_size": 256, "lr": 0.003},
                    "run": {"progress": False},
                },
                "variants": [
                    {
                        "name": "crosscoder",
                        "coder": {"kind": "crosscoder", "n_latents": 32, "k": 4},
                    },
                ],
                "evaluation": {"judge": "purity", "latents_sampled": 1, "splice": True},
            }
        )
    )
    result = experiment.run(tmp_path / "e.yaml", tmp_path / "results")
    summary = json.loads((result.results / "report" / "results.json").read_text())
    assert set(summary["recovery"]) == {"crosscoder", "crosscoder untrained"}  # + its control
    row = {r["variant"]: r for r in summary["variants"]}["crosscoder"]
    assert 0 < row["mmcs"] <= 1 and 0 <= row["recovered"] <= 1
    cal = summary["recovery"]["crosscoder"]["calibration"]
    assert set(cal) == {"fc", "fc_abs", "fc_ablation", "d_eff"}
    assert (result.results / "report" / "recovery.parquet").is_file()
    assert "Planted-feature recovery" in (result.results / "report" / "index.html").read_text()
    # trajectory statistics: medians in the summary, quantiles in the report, a table
    # beside the untrained control, and the command on the same run
    assert 0 < row["traj_dec_top2"] <= 1 and 1 <= row["traj_dec_carry"] <= 4
    quantiles = pq.read_table(result.results / "report" / "trajectories.parquet").to_pylist()
    assert {(q["variant"], q["side"]) for q in quantiles} >= {("crosscoder", "enc")}
    table = (result.results / "table.md").read_text()
    assert "Trajectory statistics" in table and "| crosscoder | control |" in table
    out = CliRunner().invoke(main, ["trajectories", str(tmp_path / "runs" / row["run_dir"])])
    assert out.exit_code == 0, out.output
    assert "crosscoder" in out.output and "top2" in out.output, out.output
