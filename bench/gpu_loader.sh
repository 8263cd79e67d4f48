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
# Offline nodes: pip honours PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels as usual.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCOMP="nvidia-nvcomp-cu12==5.1.0.21"  # pipeline/readers/gpu_decode.py names the same pin
TORCH="${TORCH_SPEC:-torch==2.13.0}"     # the Makefile's pin: PyPI serves its CUDA build
VENV="${VENV:-.venv-gpu}"
WORK="${WORK:-$PWD/.gpu-bench}"
started=$SECONDS

if [ ! -x "$VENV/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null \
    || "$PY" -m pip install --quiet "$TORCH"
"$PY" -m pip install --quiet -e . "$NVCOMP"
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
