#!/usr/bin/env bash
# The loader on a GPU, in one go (< 5 minutes on a fresh CUDA node): install what the GPU
# path needs, build a small zstd-gpu store from planted activations (no model, no text, no
# hub), then print every loader ratio on the device:
#   bench/storage_layout.py  bytes of each layout; nvCOMP decode vs zarr's CPU decode,
#                            checked bit for bit first;
#   bench/train.py           resident / memmap / stream (CPU decode) and stream on
#                            decode: gpu, each against decode-only and a raw read, plus the
#                            loader-fed / device-fed step ratios for both coders.
# Writes bench/results/storage_layout-cuda.json and bench/results/train-cuda.json.
#
#   bash bench/gpu_loader.sh            # a venv in .venv-gpu; PYTHON=python3.11 to choose
#   VENV=/path/to/venv bash bench/gpu_loader.sh   # reuse an environment that has torch+CUDA
# Offline nodes (the device tool's machine): with a .whl/ folder (bench/gpu_wheels.sh fills it
# where pip works), the wheels go into /tmp/fmx-site beside the node's own python3 and torch,
# and nothing is fetched. With the device tool, from this checkout:
#   bash bench/gpu_wheels.sh; mv results /tmp/results-aside   # 64 MiB travel per call
#   run(command="bash bench/gpu_loader.sh", carry=[".whl"], timeout_s=540)
#   mv /tmp/results-aside results        # the two JSON files come back through $OUT
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH="${TORCH_SPEC:-torch==2.13.0}"     # the Makefile's pin: PyPI serves its CUDA build
VENV="${VENV:-.venv-gpu}"
WHEELS="${WHEELS:-.whl}"
WORK="${WORK:-$PWD/.gpu-bench}"
started=$SECONDS

if [ -d "$WHEELS" ]; then  # offline: the node's python3 and torch, our wheels beside them
    PY="${PYTHON:-python3}"
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/fmx-site "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/fmx-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    if [ ! -x "$VENV/bin/python" ]; then
        "${PYTHON:-python3}" -m venv "$VENV"
    fi
    PY="$VENV/bin/python"
    "$PY" -m pip install --quiet --upgrade pip
    "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null \
        || "$PY" -m pip install --quiet "$TORCH"
    "$PY" -m pip install --quiet -e .
    # nvCOMP for the CUDA that torch was built with (pipeline/training/readers/gpu_decode.py pins it)
    "$PY" -m pip install --quiet "$("$PY" -c \
        'from pipeline.training.readers.gpu_decode import nvcomp_pin; print(nvcomp_pin())')"
fi
"$PY" - <<'EOF'
import torch
from nvidia import nvcomp

assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, nvcomp {nvcomp.__version__}")
EOF
echo "install: $((SECONDS - started)) s"

mkdir -p "$WORK"
export FMX_CACHE_DIR="$WORK/cache" FMX_DECODED_DIR="$WORK/decoded"
MANIFEST="$WORK/planted-zstd-gpu.yaml"
# 10 layers of width 576 (SmolLM2's shape), 131072 tokens: 1.5 GB of bf16 in 8 chunks
cat >"$MANIFEST" <<'EOF'
model:
  source: planted
  planted: {n_layers: 10, d_model: 576, seed: 0}
tokenization: {context_length: 128, num_tokens: 131072}
storage: {codec: zstd-gpu, chunk_tokens: 16384}
run: {progress: false}
EOF

"$PY" bench/storage_layout.py --harvest "$MANIFEST" --device cuda --chunks 8 --rounds 3
echo "storage layouts: $((SECONDS - started)) s"
"$PY" bench/train.py --harvest "$MANIFEST" --device cuda --gpu-decode \
    --rounds 2 --steps 20 --latents 4096 --batch 4096 --workers 4
echo "total: $((SECONDS - started)) s"
if [ -n "${OUT:-}" ]; then  # the device tool's folder of files that come back
    cp bench/results/storage_layout-cuda.json bench/results/train-cuda.json "$OUT"/
fi
