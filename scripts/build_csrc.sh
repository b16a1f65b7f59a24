#!/usr/bin/env bash
# Builds the "cuda" backend's epilogue library from kernels/csrc and runs its host tests:
#   build/libaltpo_csrc.so       CUDA kernels, SASS for sm_80 and sm_90 + compute_90 PTX
#   build/libaltpo_csrc_host.so  the same C ABI on the CPU (used by the Python tests)
#   ctest                        the shared math against float64 cases
# Needs cmake, a C++ compiler and nvcc (CUDA 12 or later; CI has 13.0). No GPU, no torch.
#
#   bash scripts/build_csrc.sh            # configure + build + ctest, in build/
#   BUILD_DIR=/tmp/b bash scripts/build_csrc.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${BUILD_DIR:-$root/build}"
jobs="${JOBS:-$(nproc 2>/dev/null || echo 2)}"

nvcc_bin="$(command -v nvcc || true)"
if [ -z "$nvcc_bin" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
    nvcc_bin="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
fi
if [ -z "$nvcc_bin" ]; then
    echo "build_csrc: nvcc not found (PATH, \$CUDA_HOME/bin): install the CUDA toolkit or put nvcc on PATH" >&2
    exit 1
fi

start=$(date +%s)
cmake -S "$root" -B "$build" -DALTPO_CSRC_CUDA=ON -DCMAKE_CUDA_COMPILER="$nvcc_bin" >/dev/null
cmake --build "$build" -j "$jobs" 2>&1 | grep -E "error|warning|Used [0-9]+ registers|spill|Built target" || true
test -f "$build/libaltpo_csrc.so" || { echo "build_csrc: build/libaltpo_csrc.so was not produced" >&2; exit 1; }
ctest --test-dir "$build" --output-on-failure
echo "build_csrc: configure + build + ctest in $(( $(date +%s) - start )) s ($build)"
