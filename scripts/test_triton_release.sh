#!/usr/bin/env bash
# Runs the ahead-of-time compile tests (compile report, SASS hazard and spill checks) under another
# Triton release than the project's pinned one, in a side venv that reuses .venv's packages:
#
#   bash scripts/test_triton_release.sh 3.9     # what CI runs: the newest release on the registry
#
# Each Triton release compiles with its own bundled ptxas and reads SASS with its own cuobjdump, so
# this checks that the compile path works on more than one release. Needs .venv (scripts/with-env.sh
# makes it); the side venv is .venv-triton<version> (ignored by git), made once.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="${1:?usage: test_triton_release.sh VERSION (e.g. 3.9)}"
side="$root/.venv-triton${version//./}"
base_site="$("$root/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [ ! -x "$side/bin/python" ] || [ ! -f "$side/.installed" ]; then
    rm -rf "$side"
    python3 -m venv "$side"
    site="$("$side/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$base_site" > "$site/zz_base_venv.pth"          # torch and the rest from .venv
    echo "$root/kernels" > "$site/altpo_src.pth"          # the kernels in place, as imported
    log="$(mktemp)"
    if ! "$side/bin/python" -m pip install --disable-pip-version-check "triton==${version}.*" >"$log" 2>&1; then
        cat "$log" >&2
        echo "test_triton_release: installing triton ${version} failed" >&2
        exit 1
    fi
    rm -f "$log"
    touch "$side/.installed"
fi
# the release actually imported, from the side venv (not .venv's pinned one)
"$side/bin/python" - "$version" "$side" <<'PY'
import sys
import triton
want, side = sys.argv[1], sys.argv[2]
print("triton", triton.__version__, "from", triton.__file__)
if not triton.__version__.startswith(want + ".") and triton.__version__ != want:
    sys.exit(f"test_triton_release: expected triton {want}.*, imported {triton.__version__}")
if not triton.__file__.startswith(side):
    sys.exit(f"test_triton_release: triton imported from {triton.__file__}, not from {side}")
PY
cd "$root"
"$side/bin/python" -m pytest -q -p no:cacheprovider \
    tests/kernels/triton/test_triton_compile.py tests/kernels/triton/test_sass_check.py
