#!/usr/bin/env bash
# Runs a command inside the project's virtual environment, creating it first when it is missing
# or when pyproject.toml changed since it was made. On a machine without an NVIDIA GPU it installs
# the CPU build of torch (pinned to the release that lies on the machines' disk), so nothing
# downloads gigabytes of CUDA libraries.
#
#   bash scripts/with-env.sh altpo-fast demo
#   bash scripts/with-env.sh python -m pytest -q
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${ALTPO_VENV:-$root/.venv}"
stamp="$venv/.altpo-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -c1-16)"

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[with-env] setting up $venv (once; 2 to 5 minutes on a 2-core machine)" >&2
    python3 -m venv "$venv"
    pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
    if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
            "${pip[@]}" torch
        else
            # The CPU build lies among the machines' local wheels (pip's find-links).
            "${pip[@]}" "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
        fi
    fi
    # triton is pinned to the release the GPU machines carry, so the interpreter tests and the
    # ahead-of-time compile reports run the same compiler the benchmarks do.
    "${pip[@]}" "triton==3.6.0" 2>&1 | grep -v "is ignored" || true
    "${pip[@]}" -e "$root[test]" 2>&1 | grep -v "is ignored" || true
    "$venv/bin/python" -c "import torch, triton, transformers, altpo, altpo_kernels" \
        || { echo "[with-env] install failed: see the pip output above" >&2; exit 1; }
    echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
exec "$@"
