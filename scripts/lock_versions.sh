#!/usr/bin/env bash
# Remakes constraints.txt, the locked set of versions, from today's newest releases: a scratch venv
# gets the project and its test extra without constraints, and its `pip freeze` becomes the lock.
# After it: rerun the tests (bash scripts/with-env.sh python -m pytest -q) and the docs' numbers
# (python scripts/refresh_docs.py), and commit the three together.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
scratch="$(mktemp -d /tmp/altpo-lock.XXXXXX)"
trap 'rm -rf "$scratch"' EXIT
python3 -m venv "$scratch/venv"
py="$scratch/venv/bin/python"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1; then
    # the CPU build on a CPU machine (a local +cpu wheel, else PyTorch's CPU index)
    "$py" -m pip install -q --disable-pip-version-check torch 2>/dev/null \
        || "$py" -m pip install -q --disable-pip-version-check torch --index-url https://download.pytorch.org/whl/cpu
fi
"$py" -m pip install -q --disable-pip-version-check -e "$root[test]"
{
    sed -n '1,/^# the CPU build and the CUDA build\.$/p' "$root/constraints.txt"
    "$py" -m pip freeze --exclude-editable --disable-pip-version-check \
        | grep -v -i "^altpo" | sed -E 's/^(torch==[^+]*)\+.*/\1/'
} > "$scratch/constraints.txt"
mv "$scratch/constraints.txt" "$root/constraints.txt"
echo "constraints.txt: $(grep -c '==' "$root/constraints.txt") packages locked"
