"""Massive-activation exclusion: the scan on hand-built activations, its cache, and that
training, validation, evaluation and the normalisation all drop the same tokens."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.store import outliers
from pipeline.store.reader import ActivationStore
from pipeline.training.loader import ActivationLoader, Normaliser, split_rows
from pipeline.training.manifest import recorded_manifest


class ArrayStore:
    """The slice of ActivationStore's interface the scan reads, over an in-memory array."""

    def __init__(self, x: torch.Tensor, special: np.ndarray, chunk: int, key: str = "fake"):
        self.x, self.special, self.chunk, self.key = x, special, chunk, key
        self.n_layers, self.d_model = x.shape[1], x.shape[2]
        self.n_chunks = -(-x.shape[0] // chunk)

    def chunk_rows(self, chunk: int) -> tuple[int, int]:
        return chunk * self.chunk, min((chunk + 1) * self.chunk, self.x.shape[0])

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.x[start:stop]

    def tokens(self, columns=None) -> pa.Table:
        return pa.table({"is_special": self.special})


def _planted(n=3000, layers=3, d=8, seed=0):
    """Gaussian tokens, a BOS every 100 rows with a huge norm (special: never counted), and
    three ordinary tokens blown up 100x in one layer each."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, layers, d, generator=g)
    special = np.zeros(n, dtype=bool)
    special[::100] = True
    x[::100] *= 1000.0
    planted = np.array([7, 1234, 2999])
    for layer, row in enumerate(planted):
        x[row, layer] *= 100.0
    return x, special, planted


def test_scan_finds_the_planted_tokens_and_recomputes_the_statistics():
    x, special, planted = _planted()
    result = outliers.scan(ArrayStore(x, special, chunk=512), ratio=30.0)
    np.testing.assert_array_equal(result.rows, planted)  # BOS rows are special, not outliers
    assert result.n_tokens == int((~special).sum())
    kept = torch.from_numpy(~special)
    kept[planted] = False
    xs = x[kept].double()
    torch.testing.assert_close(result.stats["mean"], xs.mean(0).float())
    torch.testing.assert_close(result.stats["mean_norm"], xs.norm(dim=-1).mean(0).float())
    centred = (xs - xs.mean(0)).pow(2).sum(-1).mean(0).sqrt().float()
    torch.testing.assert_close(result.stats["centred_rms_norm"], centred)
    # each planted token holds most of its own layer's squared norm
    assert (result.energy_share > 0.5).all()
    assert "3 of 2,970 tokens" in result.summary()


def test_a_ratio_above_every_token_excludes_nothing():
    x, special, _ = _planted()
    x[7, 0] /= 100.0
    x[1234, 1] /= 100.0
    x[2999, 2] /= 100.0
    result = outliers.scan(ArrayStore(x, special, chunk=700), ratio=30.0)
    assert result.rows.size == 0 and float(result.energy_share.max()) == 0.0


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    from pipeline import paths

    monkeypatch.setattr(paths, "data_dir", lambda: tmp_path / "data")
    return tmp_path / "data"


def _low_ratio(store: ActivationStore) -> float:
    """A ratio that catches a few of the tiny store's tokens (its norms are not heavy-tailed)."""
    norms = torch.cat(
        [store.read(*store.chunk_rows(c)).norm(dim=-1) for c in range(store.n_chunks)]
    )
    special = store.tokens(columns=["is_special"])["is_special"].to_numpy(zero_copy_only=False)
    ratio = norms[torch.from_numpy(~special)] / outliers.median_norms(store, special)
    return float(ratio.max(dim=1).values.quantile(0.98))


def test_every_split_and_the_normaliser_drop_the_same_tokens(tiny_store, data_dir):
    store = ActivationStore(tiny_store)
    ratio = _low_ratio(store)
    result = outliers.outlier_scan(store, ratio)
    assert result.rows.size > 0
    for split in ("train", "validation", "test"):
        loader = ActivationLoader(
            store,
            batch_size=64,
            split=split,
            centre=True,
            validation_fraction=0.2,
            outlier_ratio=ratio,
        )
        everything = split_rows(store, split, validation_fraction=0.2)
        assert not np.isin(loader.rows, result.rows).any()
        np.testing.assert_array_equal(np.setdiff1d(everything, result.rows), loader.rows)
        expected = Normaliser.from_store(store, loader.layers, True, result)
        torch.testing.assert_close(loader.normaliser.scale, expected.scale)
        assert loader.describe()["outlier_tokens_excluded"] == result.rows.size
        loader.close()
    kept_scale = Normaliser.from_store(store, list(range(store.n_layers)), True, result).scale
    all_scale = Normaliser.from_store(store, list(range(store.n_layers)), True).scale
    assert not torch.allclose(kept_scale, all_scale)  # the statistics really changed


def test_the_scan_is_cached_outside_the_store_and_rebuilt_when_damaged(
    tiny_store, data_dir, capsys
):
    store = ActivationStore(tiny_store)
    first = outliers.outlier_scan(store, 2.0)
    path = data_dir / "outliers" / f"{store.key}-2.safetensors"
    assert path.is_file() and not any("outlier" in p.name for p in tiny_store.rglob("*"))
    again = outliers.outlier_scan(store, 2.0)
    np.testing.assert_array_equal(first.rows, again.rows)
    payload = bytearray(path.read_bytes())
    payload[-3] ^= 0xFF  # a flipped byte in the statistics
    path.write_bytes(bytes(payload))
    rebuilt = outliers.outlier_scan(store, 2.0)
    assert "damaged outlier scan" in capsys.readouterr().err
    torch.testing.assert_close(rebuilt.stats["mean"], first.stats["mean"])
    assert outliers.outlier_scan(store, None) is None


def test_runs_recorded_before_the_rule_keep_every_token():
    base = {"name": "old", "cache": {"key": "abc"}, "coder": {"kind": "crosscoder"}}
    old = recorded_manifest({**base, "training": {"tokens": 512}})
    assert old.training.outlier_norm_ratio is None
    new = recorded_manifest({**base, "training": {"tokens": 512, "outlier_norm_ratio": 30.0}})
    assert new.training.outlier_norm_ratio == 30.0


def test_spectrum_cli_reads_the_kept_tokens_and_says_what_it_dropped(tiny_store, data_dir):
    from click.testing import CliRunner

    from pipeline.cli import main

    store = ActivationStore(tiny_store)
    root, key = str(tiny_store.parent), store.key
    ratio = _low_ratio(store)
    runner = CliRunner()
    dropped = runner.invoke(
        main, ["spectrum", key, "--cache-root", root, "--outlier-ratio", str(ratio)]
    )
    assert dropped.exit_code == 0, dropped.output
    n = outliers.outlier_scan(store, ratio).rows.size
    assert f"excluded: {n} of" in dropped.output
    kept = runner.invoke(main, ["spectrum", key, "--cache-root", root, "--outlier-ratio", "0"])
    assert kept.exit_code == 0 and "excluded" not in kept.output
    tokens = [
        int(line.split("tokens ")[1].split()[0].replace(",", ""))
        for line in (dropped.output.splitlines()[0], kept.output.splitlines()[0])
    ]
    assert (
        tokens[1] - tokens[0]
        == np.isin(outliers.outlier_scan(store, ratio).rows, split_rows(store, "train")).sum()
    )
    bad = runner.invoke(main, ["spectrum", key, "--cache-root", root, "--outlier-ratio", "0.5"])
    assert bad.exit_code != 0 and "--outlier-ratio" in bad.output


def test_a_ratio_at_or_below_one_is_a_one_line_error_naming_the_field():
    from pipeline.manifests.io import ManifestError, validate
    from pipeline.training.manifest import CoderManifest

    data = {"name": "x", "cache": {"key": "abc"}, "coder": {"kind": "crosscoder"}}
    with pytest.raises(ManifestError) as err:
        validate(CoderManifest, {**data, "training": {"outlier_norm_ratio": 1}}, "m.yaml")
    message = str(err.value)
    assert "outlier_norm_ratio" in message and "m.yaml" in message and "\n" not in message


def test_evaluate_refuses_runs_that_drop_different_tokens(tiny_store, data_dir, tmp_path):
    """Two runs of one cache, one keeping every token and one dropping outliers, would be
    scored on different test tokens: evaluate says so in one line naming the field."""
    from click.testing import CliRunner

    from pipeline.cli import main
    from pipeline.training.manifest import CoderManifest
    from stages import train

    store = ActivationStore(tiny_store)
    ratio = _low_ratio(store)
    manifests = [
        CoderManifest.model_validate(
            {
                "name": f"cc-{name}",
                "cache": {"key": store.key, "root": str(tiny_store.parent)},
                "coder": {"kind": "crosscoder", "n_latents": 16, "activation": "topk", "k": 2},
                "training": {"tokens": 4 * 64, "batch_size": 64, "outlier_norm_ratio": value},
                "run": {"runs_root": str(tmp_path / "runs"), "progress": False},
            }
        )
        for name, value in (("kept", None), ("dropped", ratio))
    ]
    runs = [str(r.run_dir) for r in train.run([(m, tmp_path) for m in manifests])]
    result = CliRunner().invoke(main, ["evaluate", *runs, "--out", str(tmp_path / "report")])
    assert result.exit_code != 0
    message = result.output.strip()
    assert "training.outlier_norm_ratio: runs differ" in message, message
    assert "\n" not in message and "Traceback" not in message
    assert not (tmp_path / "report").exists()
