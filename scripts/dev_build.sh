#!/usr/bin/env bash
# Incremental in-place build of nvit_kernels/_C for development (what `pip install .` builds, without
# the packaging). Serialised with flock so parallel callers do not race on one build folder.
# Usage: scripts/dev_build.sh   (NVIT_NO_CUDA=1, NVIT_CUDA_ARCHS=... as for pip install)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build
exec 9>build/.dev-build.lock
flock 9
py=${PYTHON:-python}
pb=$("$py" -c 'import pybind11; print(pybind11.get_cmake_dir())')
# The digest of the sources, compiled in as pip's build does: the loader refuses a stale build.
digest=$("$py" -c 'import pathlib, runpy; m = runpy.run_path("nvit_kernels/_sources.py"); print(m["source_digest"](pathlib.Path(".").resolve()))')
cmake -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PWD/nvit_kernels" -DPython_EXECUTABLE="$(command -v "$py")" \
  -Dpybind11_DIR="$pb" -DNVIT_SOURCE_DIGEST="$digest" -DNVIT_CUDA_ARCHS="${NVIT_CUDA_ARCHS:-80;86;89;90}" \
  -DNVIT_NO_CUDA="$([ "${NVIT_NO_CUDA:-0}" != 0 ] && echo ON || echo OFF)" >/dev/null
cmake --build build/dev --parallel "${NVIT_BUILD_JOBS:-2}"
