#!/usr/bin/env bash
# Here, where pip reaches the registry: fetch into .whl/ every wheel that bench/gpu_loader.sh
# needs on the device tool's GPU machine and that its image lacks. That machine is offline;
# its python3 (3.12) already holds torch (CUDA 13), numpy, pyarrow, pyyaml, safetensors,
# tqdm, click, fsspec and msgpack, but not zarr, numcodecs, their checksum packages,
# pydantic or nvCOMP (44 MiB of wheels for CUDA 13).
#
#   bash bench/gpu_wheels.sh                         # CUDA 13, Python 3.12: the H200 image
#   CUDA_MAJOR=12 PY_VERSION=3.11 bash bench/gpu_wheels.sh
#
# Then, for one device call (64 MiB travel: the tracked tree plus carried paths; results/
# holds ~52 MiB of reports, so move it out of the checkout for the call and back after):
#   run(command="bash bench/gpu_loader.sh", carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_MAJOR="${CUDA_MAJOR:-13}"
PY_VERSION="${PY_VERSION:-3.12}"
WHEELS="${WHEELS:-.whl}"
PY="${PYTHON:-.venv/bin/python}"

# the versions this checkout runs with, so the device runs the same code
PACKAGES=(zarr numcodecs crc32c google-crc32c donfig dill pydantic pydantic-core
          annotated-types typing-inspection)
pins=()
for name in "${PACKAGES[@]}"; do
    pins+=("$name==$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))")")
done
nvcomp=$("$PY" -c "from pipeline.training.readers.gpu_decode import nvcomp_pin; print(nvcomp_pin('$CUDA_MAJOR'))")
# nvidia-nvcomp-cuNN==V needs nvidia-libnvcomp-cuNN==V (the library itself)
pins+=("$nvcomp" "${nvcomp/nvcomp-cu/libnvcomp-cu}")

mkdir -p "$WHEELS"
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1 manylinux_2_5; do
    platforms+=(--platform "${tag}_x86_64")
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    --implementation cp "${platforms[@]}" -d "$WHEELS" "${pins[@]}"
ls -l "$WHEELS"
du -sh "$WHEELS"
