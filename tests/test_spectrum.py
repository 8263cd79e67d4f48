"""Layer spectrum: floors on hand-built activations with a known answer, the floor as the
FVU `evaluate` computes for the best confined decoder, the CLI, and the train warning."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.coders import coder_config_from_dict
from pipeline.evaluation import spectrum as sp
from pipeline.evaluation.reconstruction import ReconstructionAccumulator
from pipeline.evaluation.spectrum import DecoderFloor, MomentAccumulator
from pipeline.store.outliers import DEFAULT_RATIO

N, L, D = 4000, 5, 6


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layer_rank(rank: int, seed: int = 0) -> torch.Tensor:
    """``[N, L, D]`` activations whose layer axis lies in a ``rank``-dim span, with uneven
    layer scales and a large mean (the floor must not see either)."""
    g = torch.randn(L, rank, generator=_gen(seed), dtype=torch.float64)
    y = torch.randn(N, rank, D, generator=_gen(seed + 1), dtype=torch.float64)
    x = torch.einsum("lr,nrd->nld", g, y)
    scales = torch.tensor([0.1, 1.0, 3.0, 10.0, 0.5], dtype=torch.float64)[:, None]
    return x * scales + 50.0 * torch.randn(L, D, generator=_gen(seed + 2), dtype=torch.float64)


def _accumulate(x: torch.Tensor, flat: bool = False) -> MomentAccumulator:
    acc = MomentAccumulator(flat=flat)
    for batch in x.split(512):  # streamed in batches, as from a store
        acc.update(batch)
    return acc


def test_exact_rank_two_layer_structure_has_zero_floor_from_rank_two():
    rows = sp.layer_spectrum(_accumulate(_layer_rank(2)))
    assert [r.rank for r in rows] == list(range(1, L + 1))
    assert rows[0].floor_fvu > 0.1
    assert all(r.floor_fvu == pytest.approx(0.0, abs=1e-9) for r in rows[1:])
    assert sum(r.share for r in rows) == pytest.approx(1.0)


def test_floor_is_monotone_and_zero_at_full_rank():
    x = torch.randn(N, L, D, generator=_gen(5), dtype=torch.float64)
    x[:, 1] += 0.8 * x[:, 0]  # some correlation between layers
    floors = [r.floor_fvu for r in sp.layer_spectrum(_accumulate(x))]
    assert all(a >= b for a, b in itertools.pairwise(floors))
    assert floors[-1] == 0.0 and floors[0] < 1.0


def _evaluate_fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    acc = ReconstructionAccumulator(torch.ones(L))
    for a, b in zip(x.split(512), x_hat.split(512), strict=True):
        acc.update(a, b)
    return acc.result().fvu_mean


def test_floor_equals_evaluate_fvu_of_the_best_rank_r_basis_and_bounds_any_other():
    x = torch.randn(N, L, D, generator=_gen(6), dtype=torch.float64)
    x = torch.einsum("lm,nmd->nld", torch.randn(L, L, generator=_gen(7), dtype=x.dtype), x)
    x = x * torch.tensor([0.2, 1.0, 5.0, 2.0, 0.7], dtype=x.dtype)[:, None] + 3.0
    rank = 2
    floor = sp.layer_spectrum(_accumulate(x))[rank - 1].floor_fvu
    # The best decoder in a rank-2 layer span: PCA of the per-layer standardised activations
    mean = x.mean(0)
    c = x - mean
    std = c.pow(2).sum(dim=(0, 2)).div(N).sqrt()[:, None]
    z = c / std
    _, vecs = torch.linalg.eigh(torch.einsum("nld,nmd->lm", z, z))
    g = vecs[:, -rank:]  # top-2 layer profiles
    best = torch.einsum("lr,mr,nmd->nld", g, g, z) * std + mean
    assert _evaluate_fvu(x, best) == pytest.approx(floor, rel=1e-6)
    other = torch.linalg.qr(torch.randn(L, rank, generator=_gen(8), dtype=x.dtype))[0]
    worse = torch.einsum("lr,mr,nmd->nld", other, other, z) * std + mean
    assert _evaluate_fvu(x, worse) > floor


def test_cp_floor_on_flat_rank_k_data():
    atoms = torch.randn(3, L * D, generator=_gen(9), dtype=torch.float64)
    coeff = torch.randn(N, 3, generator=_gen(10), dtype=torch.float64)
    x = (coeff @ atoms).view(N, L, D) + 7.0
    acc = _accumulate(x, flat=True)
    # The flat products are float32 by design (MomentAccumulator), so each of the L*D - 3
    # discarded eigenvalues of the standardised covariance (largest <= L) may keep up to
    # float32 eps of rounding: the tolerance scales with that, not with this BLAS's luck.
    tol = L * D * torch.finfo(torch.float32).eps
    assert sp.floor_fvu(acc, DecoderFloor("cp", 3)) == pytest.approx(0.0, abs=tol)
    assert sp.floor_fvu(acc, DecoderFloor("cp", 2)) > 0.01
    assert sp.floor_fvu(acc, DecoderFloor("cp", L * D)) == 0.0


def test_cp_floor_never_below_the_layer_floor_at_rank_times_d():
    # a rank-R shared layer basis spans R*d flat dimensions: cp with R*d atoms can do as well
    noise = torch.randn(N, L, D, generator=_gen(11), dtype=torch.float64)
    x = _layer_rank(3) + 0.3 * noise
    layer = sp.layer_spectrum(_accumulate(x))[1].floor_fvu
    cp = sp.floor_fvu(_accumulate(x, flat=True), DecoderFloor("cp", 2 * D))
    assert cp <= layer + 1e-9


def _config(**over):
    cfg = {"kind": "fmxcoder", "n_layers": L, "d_model": D, "n_latents": 8, "k": 2, **over}
    return coder_config_from_dict(cfg)


def test_decoder_floor_by_factorisation():
    assert sp.decoder_floor(_config(rank=2)) == DecoderFloor("shared_basis", 2)
    assert sp.decoder_floor(_config(rank=L)) is None  # full rank spans every layer profile
    both = {"encoder_factorization": "cp", "decoder_factorization": "cp"}
    assert sp.decoder_floor(_config(rank=7, **both)) == DecoderFloor("cp", 7)
    per = {"encoder_factorization": "per_latent", "decoder_factorization": "per_latent"}
    assert sp.decoder_floor(_config(rank=1, **per)) is None
    assert sp.decoder_floor(_config(rank=2, decoder_factorization="dense")) is None
    cross = {"kind": "crosscoder", "n_layers": L, "d_model": D, "n_latents": 8, "k": 2}
    assert sp.decoder_floor(coder_config_from_dict(cross)) is None


# --- on the tiny store --------------------------------------------------------------------


def test_cli_spectrum_on_the_tiny_store(tiny_store: Path):
    runner = CliRunner()
    root, key = str(tiny_store.parent), tiny_store.name
    result = runner.invoke(main, ["spectrum", key[:8], "--cache-root", root, "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    n_layers = len(rows)
    assert [r["rank"] for r in rows] == list(range(1, n_layers + 1))
    assert set(rows[0]) == {"rank", "share", "floor_fvu"}
    assert rows[-1]["floor_fvu"] == 0.0 and 0 < rows[0]["floor_fvu"] < 1
    floors = [r["floor_fvu"] for r in rows]
    assert all(a >= b for a, b in itertools.pairwise(floors))
    sub = runner.invoke(main, ["spectrum", key, "--cache-root", root, "--layers", "0,2"])
    assert sub.exit_code == 0, sub.output
    assert "layers 2" in sub.output and sub.output.strip().splitlines()[-1].split()[0] == "2"
    bad = runner.invoke(main, ["spectrum", key, "--cache-root", root, "--layers", "0,99"])
    assert bad.exit_code != 0 and "layers: [99] out of range" in bad.output
    # the harvest manifest that made the store names the same cache
    manifest = Path(__file__).resolve().parents[1] / "manifests/harvest/tiny-random.yaml"
    by_manifest = runner.invoke(main, ["spectrum", str(manifest), "--cache-root", root, "--json"])
    assert by_manifest.exit_code == 0, by_manifest.output
    assert json.loads(by_manifest.output) == rows


def test_cli_cp_size_limit_fails_before_reading_the_store(tiny_store: Path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the store was read before the size check")

    monkeypatch.setattr(sp, "CP_MAX_DIM", 100)  # the tiny store's L*d is 4 x 64 = 256
    monkeypatch.setattr(sp, "store_spectrum", forbidden)
    args = ["spectrum", tiny_store.name, "--cache-root", str(tiny_store.parent)]
    result = CliRunner().invoke(main, [*args, "--cp-ranks", "8"])
    assert result.exit_code == 2, result.output
    assert "--cp-ranks" in result.output and "= 256: choose fewer with --layers" in result.output


def test_spectrum_reads_the_training_split_only(tiny_store: Path):
    from pipeline.store.reader import ActivationStore
    from pipeline.training.loader import split_rows

    store = ActivationStore(tiny_store)
    layers = list(range(store.n_layers))
    _, n = sp.store_spectrum(store, layers, centre=True)
    assert n == split_rows(store, "train").size
    _, capped = sp.store_spectrum(store, layers, centre=True, max_tokens=100)
    assert capped == 100


def _manifest(store: Path, runs: Path, name: str, coder: dict):
    from pipeline.training.manifest import CoderManifest

    return CoderManifest.model_validate(
        {
            "name": name,
            "cache": {"key": store.name, "root": str(store.parent)},
            "coder": {"n_latents": 32, "activation": "topk", "k": 4, **coder},
            "training": {"tokens": 256, "batch_size": 128},
            "run": {"runs_root": str(runs), "progress": False},
        }
    )


def test_train_warns_once_for_a_floored_decoder_only(tiny_store, tmp_path, monkeypatch, capsys):
    from pipeline import paths
    from pipeline.store.reader import ActivationStore
    from stages import train

    monkeypatch.setattr(paths, "data_dir", lambda: tmp_path / "data")
    store = ActivationStore(tiny_store)
    layers = list(range(store.n_layers))
    rows, _ = sp.store_spectrum(store, layers, centre=True)
    assert rows[0].floor_fvu > sp.FLOOR_WARN_FVU  # rank 1 is floored on this cache
    variants = {
        "floored": {"kind": "fmxcoder", "rank": 1},
        "full-rank": {"kind": "fmxcoder", "rank": store.n_layers},
        "dense": {"kind": "crosscoder"},
    }
    manifests = [
        (_manifest(tiny_store, tmp_path / "runs", n, c), tmp_path) for n, c in variants.items()
    ]
    train.run(manifests)
    lines = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    assert lines == [
        f"warning: floored: decoder shared_basis rank 1 confines reconstructions to a subspace "
        f"with floor FVU {rows[0].floor_fvu:.3f} on this cache (pipeline spectrum {store.key})"
    ]
    # measured on a sample and cached outside the store, keyed by store, layers and centring
    cached = paths.spectrum_cache_file(store.key, layers, True, DEFAULT_RATIO)
    assert cached.is_file() and tmp_path / "data" in cached.parents
    curve = json.loads(cached.read_text())["shared_basis"]  # every rank, measured once
    assert curve == pytest.approx([r.floor_fvu for r in rows], abs=1e-6)
    assert not any("spectrum" in p.name for p in tiny_store.rglob("*"))


def test_results_table_has_a_floor_column_blank_without_a_floor():
    from pipeline.experiment.results_table import paper_table, protocol_table, render_markdown

    base = {"n_latents": 8, "parameters": 10, "l0": 4.0, "fvu": 0.3, "mse": 1.0, "fc": 2.0}
    base |= {"d_eff": 2.0, "judge": "purity", "judge_good": 1, "judge_rated": 2}
    base |= {"dead_fraction": 0.0, "token_f1_k5": 0.8}
    summary = {
        "variants": [
            {**base, "variant": "cross", "kind": "crosscoder", "floor_fvu": None},
            {**base, "variant": "fmx", "kind": "fmxcoder", "floor_fvu": 0.1123},
            {**base, "variant": "old", "kind": "fmxcoder"},  # written before the column existed
        ]
    }
    table = paper_table(summary)
    assert [r["floor_fvu"] for r in table] == [None, 0.1123, None]
    lines = render_markdown(protocol_table(summary), summary).splitlines()
    header = [c.strip() for c in lines[2].split("|")]
    column = header.index("floor FVU")
    rows = [line for line in lines[4:] if line.startswith("|")]
    cells = [[c.strip() for c in line.split("|")][column] for line in rows]
    assert cells == ["", "0.112", ""]
