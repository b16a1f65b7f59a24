#!/usr/bin/env bash
# Builds the "cuda" backend's epilogue library from kernels/csrc and runs its host tests:
#   build/libaltpo_csrc.so       CUDA kernels, SASS for sm_80 and sm_90 + compute_90 PTX
#   build/libaltpo_csrc_host.so  the same C ABI on the CPU (used by the Python tests)
#   ctest                        the shared math against float64 cases
# Needs cmake, a C++ compiler and nvcc (CUDA 12 or later; CI has 13.0). No GPU, no torch.
#
#   bash scripts/build_csrc.sh            # configure + build + ctest, in build/
#   bash scripts/build_csrc.sh --clean    # from an empty build folder (what CI does)
#   BUILD_DIR=/tmp/b bash scripts/build_csrc.sh
#
# Any failed step (configure, compile, link, ctest) fails the script with the tool's own output.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${BUILD_DIR:-$root/build}"
jobs="${JOBS:-$(nproc 2>/dev/null || echo 2)}"

nvcc_bin=""
if command -v nvcc >/dev/null 2>&1; then
    nvcc_bin="$(command -v nvcc)"
fi
if [ -z "$nvcc_bin" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
    nvcc_bin="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
fi
if [ -z "$nvcc_bin" ]; then
    echo "build_csrc: nvcc not found (PATH, \$CUDA_HOME/bin): install the CUDA toolkit or put nvcc on PATH" >&2
    exit 1
fi

if [ "${1:-}" = "--clean" ]; then
    rm -rf "$build"
fi
start=$(date +%s)
log="$(mktemp)"
run() {  # a build step: its output shown in full when it fails
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        echo "build_csrc: failed: $*" >&2
        exit 1
    fi
}
run cmake -S "$root" -B "$build" -DALTPO_CSRC_CUDA=ON -DCMAKE_CUDA_COMPILER="$nvcc_bin"
run cmake --build "$build" -j "$jobs"
# the register and spill lines of every kernel, and any warning
grep -E "warning|Used [0-9]+ registers|spill|Built target" "$log" || echo "build_csrc: (no register report in the build log)"
rm -f "$log"
for lib in libaltpo_csrc.so libaltpo_csrc_host.so; do
    test "$build/$lib" -nt "$root/kernels/csrc/altpo_csrc.h" \
        || { echo "build_csrc: $build/$lib is missing or older than its sources" >&2; exit 1; }
done
ctest --test-dir "$build" --output-on-failure
echo "build_csrc: configure + build + ctest in $(( $(date +%s) - start )) s ($build)"
