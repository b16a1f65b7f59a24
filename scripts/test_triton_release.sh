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
if [ ! -x "$side/bin/python" ]; then
    python3 -m venv "$side"
    site="$("$side/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$base_site" > "$site/zz_base_venv.pth"          # torch and the rest from .venv
    mkdir -p "$side/src"
    ln -sfn "$root/kernels" "$side/src/altpo_kernels"     # the kernels in place, as imported
    echo "$side/src" > "$site/altpo_src.pth"
    "$side/bin/python" -m pip install --quiet --disable-pip-version-check "triton==${version}.*" 2>&1 \
        | grep -v "is ignored" || true
fi
"$side/bin/python" -c "import triton; print('triton', triton.__version__, 'from', triton.__file__)"
cd "$root"
"$side/bin/python" -m pytest -q -p no:cacheprovider \
    tests/kernels/triton/test_triton_compile.py tests/kernels/triton/test_sass_check.py
