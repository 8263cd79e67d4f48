"""``decode: gpu`` on a machine without one: the zstd-gpu layout round-trips bit for bit,
the GPU decoder's logic (shard index, crc32c, unshuffle, row selection) matches zarr's own
read with numcodecs standing in for nvCOMP, and every refusal is one line naming the fix."""

from __future__ import annotations

import importlib.metadata
import itertools
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from numcodecs import Shuffle
from pydantic import ValidationError

from pipeline.harvest.cache_key import cache_key
from pipeline.manifests.harvest import HarvestManifest
from pipeline.store import format as store_format
from pipeline.store.reader import ActivationStore
from pipeline.training.loader import ActivationLoader, split_rows
from pipeline.training.manifest import TrainRunSpec
from pipeline.training.readers import ChunkDecoder, Normaliser, gpu_decode
from stages import harvest
from tests.helpers import TINY

REPO = Path(__file__).resolve().parents[1]
# 384-row chunks over 2048 tokens: the last shard is partial, its tail frames never written
MANIFEST = {**TINY, "storage": {"chunk_tokens": 384}}


def harvest_with(root: Path, codec: str) -> ActivationStore:
    manifest = {**MANIFEST, "storage": {**MANIFEST["storage"], "codec": codec}}
    return ActivationStore(harvest.run(HarvestManifest.model_validate(manifest), root).path)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, ActivationStore]:
    """The same harvest in both layouts; zstd-gpu frames of 32 rows (6 KiB at d=64)."""
    saved = store_format.GPU_FRAME_BYTES
    store_format.GPU_FRAME_BYTES = 32 * 64 * 2
    try:
        return {
            codec: harvest_with(tmp_path_factory.mktemp(codec), codec)
            for codec in ("zstd", "zstd-gpu")
        }
    finally:
        store_format.GPU_FRAME_BYTES = saved


@pytest.fixture(autouse=True)
def decoded_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FMX_DECODED_DIR", str(tmp_path / "decoded"))
    return tmp_path / "decoded"


def test_gpu_layout_round_trips_bit_for_bit(stores):
    plain, gpu = stores["zstd"], stores["zstd-gpu"]
    assert gpu.arrays[0].shards == (384, 64) and gpu.arrays[0].chunks == (32, 64)
    gpu.verify()  # every block's crc32c, as harvested
    for layer in range(plain.n_layers):
        np.testing.assert_array_equal(
            gpu.read_stored(0, gpu.n_tokens, [layer]), plain.read_stored(0, plain.n_tokens, [layer])
        )


def test_gpu_layout_has_its_own_cache_key(tiny_manifest):
    default = cache_key(tiny_manifest())
    assert cache_key(tiny_manifest(**{"storage.codec": "zstd-gpu"})) != default
    assert cache_key(tiny_manifest(**{"storage.codec": "none"})) == default


def test_frame_rows_divide_the_chunk_and_fit_the_frame_budget():
    assert store_format.gpu_frame_rows(16384, 576 * 2) == 512  # 590 KB frames
    assert store_format.gpu_frame_rows(384, 1 << 20) == 1
    for chunk in (96, 384, 4096):
        rows = store_format.gpu_frame_rows(chunk, 1000)
        assert chunk % rows == 0 and rows * 1000 <= store_format.GPU_FRAME_BYTES


@pytest.mark.parametrize("itemsize", [1, 2, 4])
def test_unshuffle_inverts_numcodecs_shuffle(itemsize):
    raw = np.random.default_rng(itemsize).integers(0, 256, size=(3, 96), dtype=np.uint8)
    shuffled = np.stack([np.frombuffer(Shuffle(itemsize).encode(r), np.uint8) for r in raw])
    back = gpu_decode.unshuffle(torch.from_numpy(shuffled.copy()), itemsize)
    np.testing.assert_array_equal(back.numpy(), raw)


def test_frames_are_packed_aligned_for_nvcomp():
    frames = [bytes([i]) * size for i, size in enumerate((5, 16, 1, 33))]
    bounds, total = gpu_decode.frame_bounds([len(f) for f in frames])
    assert all(start % gpu_decode.ALIGN == 0 for start, _ in bounds)
    assert all(stop <= nxt for (_, stop), (nxt, _) in itertools.pairwise(bounds))
    staging = np.zeros(total, dtype=np.uint8)
    gpu_decode.pack_frames(frames, bounds, staging)
    assert [staging[a:b].tobytes() for a, b in bounds] == frames


@pytest.mark.parametrize("normalised", [False, True], ids=["stored", "normalised"])
def test_gpu_decoder_matches_zarr(stores, normalised):
    """Chunks in any order and grouping, rows of a split, both output kinds: the same
    tensor, bit for bit, as the CPU decoder reading through zarr."""
    store = stores["zstd-gpu"]
    layers = [0, 2, 3]
    rows = split_rows(store, "train")
    reference = ChunkDecoder(store, layers, rows, workers=2)
    decoder = gpu_decode.GpuChunkDecoder(
        store, layers, rows, 2, device=torch.device("cpu"), frames=gpu_decode.CpuFrames()
    )
    normaliser = Normaliser.from_store(store, layers, centre=True) if normalised else None
    for chunks in ([0], [5], [3, 1, 4], list(range(store.n_chunks))):
        want = reference.decode(chunks, normaliser)
        got = decoder.decode(chunks, normaliser)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert decoder.rows_read > 0


def test_a_flipped_bit_in_a_frame_names_the_shard(stores, tmp_path):
    store = stores["zstd-gpu"]
    copy = tmp_path / "store"
    subprocess.run(["cp", "-r", str(store.paths.root), str(copy)], check=True)
    damaged = ActivationStore(copy)
    shard = damaged.paths.array(damaged.hook_names[1]) / "c" / "2" / "0"
    data = bytearray(shard.read_bytes())
    data[10] ^= 1
    shard.write_bytes(bytes(data))
    decoder = gpu_decode.GpuChunkDecoder(
        damaged,
        [1],
        split_rows(damaged, "all"),
        1,
        device=torch.device("cpu"),
        frames=gpu_decode.CpuFrames(),
    )
    with pytest.raises(gpu_decode.GpuDecodeError, match=rf"{shard}: frame at byte 0: checksum"):
        decoder.decode([2], None)


def test_default_store_refuses_gpu_decode_naming_the_storage_option(stores):
    with pytest.raises(gpu_decode.GpuDecodeError) as err:
        ActivationLoader(stores["zstd"], batch_size=64, mode="stream", decode="gpu")
    message = str(err.value)
    assert "\n" not in message and "storage: {codec: zstd-gpu}" in message
    assert str(stores["zstd"].paths.root) in message


def test_gpu_decode_without_cuda_is_one_line(stores, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(gpu_decode.GpuDecodeError) as err:
        ActivationLoader(stores["zstd-gpu"], batch_size=64, mode="stream", decode="gpu")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("decode: gpu needs a CUDA device") and "no CUDA device" in message
    with pytest.raises(ValueError, match="decode must be cpu or gpu, not 'tpu'"):
        ActivationLoader(stores["zstd-gpu"], batch_size=64, mode="stream", decode="tpu")


def test_missing_nvcomp_is_one_line_with_the_install_command(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(__import__("sys").modules, "nvidia.nvcomp", None)
    with pytest.raises(gpu_decode.GpuDecodeError, match=r"pip install nvidia-nvcomp-cu12=="):
        gpu_decode.require_cuda(torch.device("cuda"))


@pytest.mark.parametrize("mode", ["resident", "memmap", "stream"])
def test_loader_with_gpu_decode_serves_the_cpu_batches(stores, monkeypatch, mode):
    """The whole loader on decode: gpu (numcodecs standing in for nvCOMP): same batches."""
    monkeypatch.setattr(gpu_decode, "frame_decoder_for", lambda device: gpu_decode.CpuFrames())
    store = stores["zstd-gpu"]
    common = {"batch_size": 100, "mode": mode, "buffer_chunks": 2, "seed": 5}
    cpu = ActivationLoader(store, **common)
    gpu = ActivationLoader(store, **common, decode="gpu")
    assert gpu.describe()["decode"] == "gpu"
    for want, got in zip(cpu.epoch(1), gpu.epoch(1), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_run_section_validates_decode():
    assert TrainRunSpec.model_validate({"decode": "gpu"}).decode == "gpu"
    for bad in ("GPU", 1, True):
        with pytest.raises(ValidationError, match="decode"):
            TrainRunSpec.model_validate({"decode": bad})


def test_gpu_loader_script_parses():
    script = REPO / "bench" / "gpu_loader.sh"
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_storage_layout_bench_runs_on_the_cpu(tmp_path):
    """The Python half of bench/gpu_loader.sh: both layouts written, sized, decoded."""
    import json
    import os
    import sys

    import yaml

    manifest = tmp_path / "tiny.yaml"
    manifest.write_text(yaml.safe_dump(MANIFEST))
    out = tmp_path / "layouts.json"
    env = {**os.environ, "FMX_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    command = [sys.executable, "bench/storage_layout.py", "--harvest", str(manifest)]
    command += ["--chunks", "2", "--rounds", "1", "--out", str(out)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["tokens"] == 2 * 384
    assert figures["zstd-gpu_bytes"] > 0 and figures["zstd_gpu_bytes_vs_zstd"] > 0.5
    assert figures["zstd-gpu_cpu_decode_rows_per_s"] > 0


def test_train_bench_gpu_decode_path_runs_on_the_cpu(tmp_path):
    """bench/train.py --gpu-decode end to end, numcodecs standing in for nvCOMP: the GPU
    session's minutes go to measuring, not to finding a wiring mistake."""
    import json
    import os
    import sys

    import yaml

    manifest = tmp_path / "tiny-gpu.yaml"
    manifest.write_text(
        yaml.safe_dump({**MANIFEST, "storage": {"chunk_tokens": 384, "codec": "zstd-gpu"}})
    )
    out = tmp_path / "train.json"
    args = ["--harvest", str(manifest), "--device", "cpu", "--gpu-decode", "--out", str(out)]
    args += ["--latents", "64", "--k", "4", "--batch", "64", "--steps", "2", "--rounds", "1"]
    args += ["--quality-batches", "2", "--inline-ab"]
    wrapper = tmp_path / "run.py"
    wrapper.write_text(
        "import runpy, sys\n"
        "sys.path.insert(0, 'bench')\n"
        "from pipeline.training.readers import gpu_decode\n"
        "gpu_decode.frame_decoder_for = lambda device: gpu_decode.CpuFrames(device)\n"
        f"sys.argv = ['bench/train.py', *{args!r}]\n"
        "runpy.run_path('bench/train.py', run_name='__main__')\n"
    )
    env = {
        **os.environ,
        "FMX_CACHE_DIR": str(tmp_path / "cache"),
        "FMX_DECODED_DIR": str(tmp_path / "decoded"),
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, str(wrapper)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    for key in (
        "gpu_decode_vs_cpu_decode",
        "stream_gpu_decode_vs_stream",
        "stream_gpu_decode_vs_decode_only",
        "crosscoder_stream_gpu_decode_vs_device",
        "fmxcoder_stream_gpu_decode_vs_device",
        "stream_gpu_decode_shuffle_quality",
        "crosscoder_memmap_inline_vs_device",
    ):
        assert figures[key] > 0, key
    assert figures["crosscoder_stream_vs_device_round_sd"] == 0.0  # one round: no spread


def test_nvcomp_pin_follows_the_cuda_major_version():
    from pipeline.training.readers.gpu_decode import nvcomp_pin

    assert nvcomp_pin("12.8").startswith("nvidia-nvcomp-cu12==")
    assert nvcomp_pin("13.0").startswith("nvidia-nvcomp-cu13==")


# What the device tool's GPU image already holds (bench/gpu_wheels.sh's header says so).
DEVICE_IMAGE = {
    "torch", "torchgen", "numpy", "pyarrow", "yaml", "safetensors", "tqdm", "click", "fsspec",
    "msgpack", "cloudpickle", "filelock", "packaging", "typing_extensions",
}  # fmt: skip


def test_gpu_wheels_cover_every_package_the_gpu_bench_imports():
    """The offline node gets exactly the wheels bench/gpu_wheels.sh fetches: every
    third-party module the GPU bench imports must be in the image or in that list."""
    import re
    import sys

    probe = (
        "import sys; sys.path.insert(0, 'bench'); import train, storage_layout; "
        "import pipeline.training.readers.gpu_decode; "
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True
    )
    ours = {"pipeline", "stages", "common", "train", "storage_layout"}
    imported = {
        m
        for m in done.stdout.split()
        if m not in sys.stdlib_module_names and not m.startswith("_") and m not in ours
    }
    imported -= {"cython_runtime"}  # an interpreter module, no package
    distributions = importlib.metadata.packages_distributions()
    script = (REPO / "bench" / "gpu_wheels.sh").read_text()
    listed = re.search(r"PACKAGES=\(([^)]*)\)", script).group(1).split()
    fetched = {name.replace("-", "_").lower() for name in listed}
    missing = {
        module
        for module in imported - DEVICE_IMAGE
        if not {d.replace("-", "_").lower() for d in distributions.get(module, [module])} & fetched
    }
    assert not missing, f"imported by the GPU bench, neither in the image nor fetched: {missing}"
