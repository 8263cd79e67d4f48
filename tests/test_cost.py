"""The multiply-add counts of pipeline.coders.cost against FLOPs counted by torch.

``FlopCounterMode`` sees the aten ops a forward and backward actually dispatch, with their
shapes, so it shares nothing with the formulas but the convention (1 MAC = 2 FLOPs,
elementwise ops free). It has no formula for ``embedding_bag`` (the sparse decode), so the
test gives it one: each gathered row times the row width, forward and each backward.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from pipeline.coders import build_coder, coder_config_from_dict
from pipeline.coders.cost import macs_per_token, parameter_count
from pipeline.experiment.manifest import load_experiment, variant_manifests
from pipeline.manifests.io import ManifestError
from pipeline.training.manifest import CoderManifest

BATCH, L, D = 48, 3, 16


_SIZE = torch.Size
aten = torch.ops.aten
BAG_FLOPS = {
    aten._embedding_bag: lambda w, idx, *a, **k: 2 * _SIZE(idx).numel() * w[-1],
    aten._embedding_bag_forward_only: lambda w, idx, *a, **k: 2 * _SIZE(idx).numel() * w[-1],
    aten._embedding_bag_backward: lambda g, idx, *a, **k: 2 * _SIZE(idx).numel() * g[-1],
    aten._embedding_bag_per_sample_weights_backward: (
        lambda g, w, idx, *a, **k: 2 * _SIZE(idx).numel() * g[-1]
    ),
}


def counted_macs(fn) -> float:
    """Multiply-adds ``fn`` dispatches, per token of the test batch."""
    with FlopCounterMode(display=False, custom_mapping=BAG_FLOPS) as counter:
        fn()
    return counter.get_total_flops() / 2 / BATCH


FMX = {"kind": "fmxcoder", "masking_probability": 0.5, "collapse_coefficient": 0.1}


def fmx(encoder: str, decoder: str, rank: int | None, **fields) -> dict:
    """An fmxcoder with masking and the collapse penalty unless ``fields`` say otherwise."""
    readings = {"encoder_factorization": encoder, "decoder_factorization": decoder}
    return {**FMX, **readings, "rank": rank, **fields}


CONFIGS = {
    "crosscoder topk (sparse decode)": {"kind": "crosscoder"},
    "crosscoder topk k > m/16 (dense)": {"kind": "crosscoder", "k": 20},
    "crosscoder relu": {"kind": "crosscoder", "activation": "relu", "k": None},
    "crosscoder jumprelu": {"kind": "crosscoder", "activation": "jumprelu", "k": None},
    "per-layer SAE": {"kind": "per_layer_sae", "n_latents": None, "latents_per_layer": 40},
    "fmx dense + masking": fmx("dense", "dense", None),
    "fmx per_latent R2": fmx("per_latent", "per_latent", 2),
    "fmx shared_basis R2": fmx("shared_basis", "shared_basis", 2),
    "fmx cp R5": fmx("cp", "cp", 5),
    "fmx cp R24 > d, relu": fmx(
        "cp", "cp", 24, activation="relu", k=None, masking_probability=0, collapse_coefficient=0
    ),
    "fmx enc dense, dec per_latent": fmx("dense", "per_latent", 3),
}


def build(fields: dict):
    """A coder of the test's shape; a None field is left unset."""
    base = {"n_layers": L, "d_model": D, "n_latents": 128, "activation": "topk", "k": 4}
    merged = {key: value for key, value in (base | fields).items() if value is not None}
    return build_coder(coder_config_from_dict(merged))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_step_macs_match_the_flops_torch_counts(name):
    c = build(CONFIGS[name]).train()
    x = torch.randn(BATCH, L, D)

    def step() -> None:
        c.training_loss(x, 5, 10).loss.backward()

    expected = c.macs_per_token(BATCH)
    assert counted_macs(step) == pytest.approx(expected.step, rel=1e-9)


@pytest.mark.parametrize("auxk_k", [None, 4])  # default d/2: dense; 4 <= m/16: sparse
@pytest.mark.parametrize("name", ["crosscoder topk (sparse decode)", "fmx shared_basis R2"])
def test_auxk_step_macs_match(name, auxk_k):
    c = build({**CONFIGS[name], "auxk_k": auxk_k}).train()
    c.tokens_since_fired.fill_(10**9)  # every latent dead: AuxK runs
    c.forget_firing_bound()
    x = torch.randn(BATCH, L, D)
    measured = counted_macs(lambda: c.training_loss(x, 5, 10).loss.backward())
    expected = c.macs_per_token(BATCH)
    assert measured == pytest.approx(expected.step_auxk, rel=1e-9)
    assert expected.step_auxk > expected.step


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encode_and_decode_macs_match(name):
    c = build(CONFIGS[name]).eval()
    x = torch.randn(BATCH, L, D)
    expected = c.macs_per_token(BATCH)
    with torch.no_grad():
        enc, dec = c.encoder_view(), c.decoder_view()  # per_latent builds W here, per step
        f = torch.relu(torch.randn(BATCH, c.n_latents))
        assert counted_macs(lambda: enc.encode(x)) == pytest.approx(expected.encode)
        assert counted_macs(lambda: dec.decode(f)) == pytest.approx(expected.decode)
        k = c.config.k
        if expected.decode_sparse is not None and k * c.config.n_groups <= c.n_latents / 16:
            codes = c.activation(torch.randn(BATCH, c.n_latents))
            measured = counted_macs(lambda: dec.decode_sparse(codes, k))
            assert measured == pytest.approx(expected.decode_sparse)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_count_from_config_matches_the_module(name):
    c = build(CONFIGS[name])
    assert parameter_count(c.config) == c.num_parameters()


def test_per_latent_has_fewer_parameters_but_costs_more_per_step():
    """The issue's point: 5x fewer parameters is not cheaper."""
    dims = {"n_layers": 10, "d_model": 576, "n_latents": 1024, "activation": "topk", "k": 32}
    dense = coder_config_from_dict({"kind": "crosscoder", **dims})
    default = coder_config_from_dict(
        {**dims, **fmx("per_latent", "per_latent", 2, masking_probability=0.25)}
    )
    assert parameter_count(default) * 4 < parameter_count(dense)
    assert macs_per_token(default, 512).step > macs_per_token(dense, 512).step


def test_a_finished_run_records_its_median_step_time(tiny_cache_root, tmp_path):
    """Steps past the warm-up are timed; validation and checkpoints are not steps."""
    from pipeline.training.manifest import CoderManifest
    from pipeline.training.trainer import STEP_TIME_WARMUP, read_step_time
    from stages import train

    key = next(p.name for p in tiny_cache_root.iterdir() if p.is_dir())
    manifest = CoderManifest.model_validate(
        {
            "name": "timed",
            "cache": {"key": key, "root": str(tiny_cache_root)},
            "coder": {"kind": "crosscoder", "n_latents": 64, "activation": "topk", "k": 4},
            "training": {"tokens": 1280, "batch_size": 128, "checkpoint_every": 4},
            "run": {"runs_root": str(tmp_path), "progress": False},
        }
    )
    (result,) = train.run([(manifest, tmp_path)])
    timing = read_step_time(result.run_dir)
    assert timing is not None and timing["step"] == result.steps == 10
    assert timing["steps_timed"] == 10 - STEP_TIME_WARMUP
    assert 0 < timing["median_s"] < 5
    assert "step_time.json" not in {p.name for p in (result.run_dir / "final").iterdir()}


REPO = Path(__file__).resolve().parents[1]
SMOLLM_HARVEST = REPO / "manifests" / "harvest" / "smollm2-wiki-cpu-large.yaml"
FMX_VARIANT = {
    "name": "fmx",
    "coder": {"kind": "fmxcoder", "n_latents": 1024, "activation": "topk", "k": 32,
              **fmx("per_latent", "per_latent", 2, masking_probability=0.25)},
}  # fmt: skip


def experiment_file(tmp_path: Path, variants: list[dict], harvest: Path = SMOLLM_HARVEST) -> Path:
    path = tmp_path / "e.yaml"
    doc = {
        "name": "e",
        "harvest": str(harvest),
        "defaults": {"layers": "all", "training": {"batch_size": 512}},
        "variants": variants,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def matched(measure: str) -> dict:
    return {
        "name": f"matched-{measure}",
        "match": {measure: "fmx"},
        "coder": {"kind": "crosscoder", "activation": "topk", "k": 32},
    }


def resolved(path: Path) -> dict[str, CoderManifest]:
    experiment, base = load_experiment(path)
    return {m.name: m for m, _ in variant_manifests(experiment, base, str(path))}


def test_match_sets_the_smallest_n_latents_reaching_the_target(tmp_path):
    """10 layers x 576 (the cpu-large harvest): 209 latents is the count cpu-large.yaml
    wrote by hand; the compute match is the first n whose step reaches the fmxcoder's."""
    runs = resolved(
        experiment_file(tmp_path, [FMX_VARIANT, matched("params"), matched("step_macs")])
    )
    assert runs["matched-params"].coder["n_latents"] == 209
    target = coder_config_from_dict({**runs["fmx"].coder, "n_layers": 10, "d_model": 576})
    n = runs["matched-step_macs"].coder["n_latents"]
    crosscoder = {**runs["matched-step_macs"].coder, "n_layers": 10, "d_model": 576}

    def step(latents: int) -> float:
        config = coder_config_from_dict({**crosscoder, "n_latents": latents})
        return macs_per_token(config, 512).step

    goal = macs_per_token(target, 512).step
    assert step(n) >= goal > step(n - 1)
    assert parameter_count(target) <= parameter_count(coder_config_from_dict(crosscoder))


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ({**matched("params"), "match": {"params": "nope"}}, r"field 'match'.params: no other"),
        ({**matched("params"), "match": {"flops": "fmx"}}, r"field 'match': must be one of"),
        (
            {**matched("params"), "coder": {"kind": "per_layer_sae", "latents_per_layer": 9}},
            r"field 'match': sets n_latents, which a 'per_layer_sae'",
        ),
        (
            {**matched("params"), "coder": {"kind": "crosscoder", "n_latents": 5, "k": 2}},
            r"field 'match': sets coder.n_latents; leave it out",
        ),
    ],
)
def test_match_errors_name_the_field(tmp_path, variant, message):
    with pytest.raises(ManifestError, match=rf"variants\[1\] 'matched-params': {message}"):
        load_experiment(experiment_file(tmp_path, [FMX_VARIANT, variant]))


def test_match_needs_a_harvest_whose_shape_is_known(tmp_path):
    harvest = tmp_path / "h.yaml"
    harvest.write_text("model: {source: hub, name: some/model, revision: abc}\n")
    path = experiment_file(tmp_path, [FMX_VARIANT, matched("params")], harvest)
    with pytest.raises(ManifestError, match=r"field 'match': needs the harvest's layer count"):
        load_experiment(path)


def test_table_shows_macs_per_variant_and_step_seconds_only_on_the_console():
    from pipeline.experiment.results_table import protocol_table, render_markdown, step_time_lines
    from tests.test_protocol import _row

    cost = {"macs_encode": 5.9e6, "macs_decode": 5.9e6, "macs_decode_sparse": 1.8e5}
    rows = [_row("cc", "trained", seed, 0.3, 4.0) for seed in (0, 1)]
    rows.append(_row("cc", "control", 0, 1.0, 5.0))
    for row, step_s in zip(rows, (0.5, 0.7, None), strict=True):
        row["cost"] = {**cost, "macs_step": 1.2e7, "step_s": step_s}
    summary = {"variants": rows, "baselines": []}
    table = protocol_table(summary)
    assert [r["macs_step"] for r in table] == [1.2e7, 1.2e7]
    assert all("step_s" not in r for r in table)  # a rerun elsewhere rewrites it byte for byte
    assert "| 5.9M / 5.9M (0.18M) / 12M |" in render_markdown(table, summary)
    assert step_time_lines(summary) == ["step s (median, this machine): cc 0.600 over 2 run(s)"]
