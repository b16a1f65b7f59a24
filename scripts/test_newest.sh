#!/usr/bin/env bash
# The project against the newest releases of its dependencies, in a side venv (.venv-newest):
# whatever pip resolves today without constraints.txt (torch, transformers, triton, peft, datasets,
# ...). CI runs it beside the locked suite, so a release that breaks the project fails CI the day
# it appears. It runs: the imports, the repo-root import test (nothing here shadows an installed
# package), a 2-step tiny training through torchrun from the repository root, and the kernel tests.
#
#   bash scripts/test_newest.sh            # remakes .venv-newest when it is older than a day
#   FRESH=1 bash scripts/test_newest.sh    # always remakes it
#
# A machine-wide pip constraint (PIP_CONSTRAINT, /etc/pip.conf) still applies: "newest" means the
# newest that this machine's installer allows. The versions installed are printed and checked
# against what the resolver chose.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
side="${ALTPO_NEWEST_VENV:-$root/.venv-newest}"
py="$side/bin/python"
packages=(torch transformers triton peft datasets tokenizers safetensors accelerate)

fail() { echo "test_newest: $*" >&2; exit 1; }

if [ "${FRESH:-0}" = 1 ] || [ ! -f "$side/.installed" ] || [ -n "$(find "$side/.installed" -mmin +1440)" ]; then
    rm -rf "$side"
    python3 -m venv "$side"
    report="$side/resolved.json"
    log="$side/install.log"
    # resolve first (the chosen versions land in a report), then install exactly those
    "$py" -m pip install --disable-pip-version-check --upgrade pip >"$log" 2>&1 || { cat "$log" >&2; fail "pip upgrade failed"; }
    "$py" -m pip install --disable-pip-version-check --dry-run --ignore-installed --report "$report" \
        "${packages[@]}" -e "$root[test]" >>"$log" 2>&1 || { cat "$log" >&2; fail "resolving the newest releases failed"; }
    "$py" -m pip install --disable-pip-version-check --upgrade "${packages[@]}" -e "$root[test]" >>"$log" 2>&1 \
        || { cat "$log" >&2; fail "installing the newest releases failed"; }
    touch "$side/.installed"
fi

# the installed versions: what the resolver chose, and never older than the locked ones
"$py" - "$side/resolved.json" "$root/constraints.txt" "${packages[@]}" <<'PY'
import json
import sys
from importlib.metadata import version

from packaging.version import Version

report, lock, names = sys.argv[1], sys.argv[2], sys.argv[3:]
chosen = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.load(open(report))["install"]}
locked = {}
for line in open(lock):
    line = line.split("#")[0].strip()
    if "==" in line:
        name, v = line.split("==")
        locked[name.lower()] = v
bad = []
for name in names:
    got = version(name)
    line = f"  {name:<14} {got:<16} (locked {locked.get(name, '-')})"
    if name in chosen and got != chosen[name]:
        bad.append(f"{name}: installed {got}, resolved {chosen[name]}")
    if name in locked and Version(got.split("+")[0]) < Version(locked[name]):
        bad.append(f"{name}: installed {got} is older than the locked {locked[name]}")
    print(line)
if bad:
    sys.exit("test_newest: " + "; ".join(bad))
PY

cd "$root"
export TRITON_INTERPRET=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
echo "test_newest: imports"
"$py" -c "import torch, transformers, triton, peft, altpo, altpo_kernels, altpo.cli, altpo.train.loop"
echo "test_newest: repo-root imports, tiny train through torchrun, kernel tests"
"$py" -m pytest -q -p no:cacheprovider tests/test_fresh_root.py tests/kernels \
    --ignore=tests/kernels/csrc --ignore=tests/kernels/triton/test_triton_compile.py \
    --ignore=tests/kernels/triton/test_sass_check.py
