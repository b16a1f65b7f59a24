#!/usr/bin/env bash
# Runs a command inside the project's virtual environment, creating it first when it is missing
# or when pyproject.toml or constraints.txt changed since it was made. Every package is installed
# at the version locked in constraints.txt. On a machine without an NVIDIA GPU the CPU build of
# torch is installed, so nothing downloads gigabytes of CUDA libraries.
#
#   bash scripts/with-env.sh altpo-fast demo --output demo-out
#   bash scripts/with-env.sh python -m pytest -q
#
# ALTPO_VENV=DIR puts the environment elsewhere. A failed install stops here with pip's own output.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${ALTPO_VENV:-$root/.venv}"
stamp="$venv/.altpo-installed"
lock="$root/constraints.txt"
want="$(cat "$root/pyproject.toml" "$lock" | sha256sum | cut -c1-16)"

install() {  # pip install with the lock; on failure, pip's output and a non-zero exit
    local log
    log="$(mktemp)"
    if ! "$venv/bin/python" -m pip install --disable-pip-version-check -c "$lock" "$@" >"$log" 2>&1; then
        sed '/is ignored: it is neither/d' "$log" >&2   # pip's output, without the find-links noise
        rm -f "$log"
        echo "[with-env] pip install $* failed (output above)" >&2
        exit 1
    fi
    rm -f "$log"
}

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[with-env] setting up $venv with the versions in constraints.txt (once; 2 to 5 minutes)" >&2
    python3 -m venv "$venv"
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
        install torch
    else
        # the CPU build: the machine's local +cpu wheel when it has one (pip's find-links), else
        # PyTorch's CPU index
        cpu="torch==$(sed -n 's/^torch==//p' "$lock")+cpu"
        if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check -c "$lock" "$cpu" >/dev/null 2>&1; then
            install "$cpu" --index-url https://download.pytorch.org/whl/cpu
        fi
    fi
    install -e "$root[test]"
    "$venv/bin/python" - "$lock" <<'PY' || { echo "[with-env] the environment does not match constraints.txt" >&2; exit 1; }
import sys
from importlib.metadata import version
want = {}
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if "==" in line:
        name, v = line.split("==")
        want[name.lower()] = v
bad = []
for name in ("torch", "triton", "transformers", "peft", "datasets", "tokenizers", "safetensors"):
    got = version(name).split("+")[0]
    if name in want and got != want[name]:
        bad.append(f"{name} {got} (locked {want[name]})")
if bad:
    sys.exit("[with-env] installed versions differ from constraints.txt: " + ", ".join(bad))
import torch, triton, transformers, altpo, altpo_kernels  # noqa: E401,F401
PY
    echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
exec "$@"
