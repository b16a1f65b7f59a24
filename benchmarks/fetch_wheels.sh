#!/usr/bin/env bash
# Downloads the optional comparison libraries as wheels into .whl/ (git-ignored), on a machine
# that reaches the package index, so that benchmarks/gpu_suite.sh can install them on a GPU
# machine that reaches nothing: Liger-Kernel, cut-cross-entropy and TRL (its fused LM head,
# trl.kernels.chunked_logprob). All are pure-Python wheels (Triton kernels inside); their torch and
# triton requirements are met by the GPU image, so no dependency is fetched (a peer whose import
# then fails is reported absent with the error, not a suite failure).
#
#   bash benchmarks/fetch_wheels.sh && ls .whl
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$root/.whl"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$root/.whl" \
    "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1" "trl==1.16.0"
ls -l "$root/.whl"
