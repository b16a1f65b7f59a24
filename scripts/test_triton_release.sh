#!/usr/bin/env bash
# Runs the ahead-of-time compile tests (compile report, SASS hazard and spill checks) under another
# Triton release than the project's pinned one, in a side venv that reuses .venv's packages:
#
#   bash scripts/test_triton_release.sh 3.9     # what CI runs: the newest release on the registry
#
# Each Triton release compiles with its own bundled ptxas and reads SASS with its own cuobjdump, so
# this checks that the compile path works on more than one release. Needs .venv (scripts/with-env.sh
# makes it); the side venv is .venv-triton<version> (ignored by git), made once by
# scripts/side-venv.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="${1:?usage: test_triton_release.sh VERSION (e.g. 3.9)}"
side="$root/.venv-triton${version//./}"
source "$root/scripts/side-venv.sh"
side_venv_make "$side" test_triton_release base-first "triton==${version}.*"
echo "$root/kernels" > "$(side_venv_site "$side")/altpo_src.pth"   # the kernels in place, as imported
# the release actually imported, from the side venv (not .venv's pinned one)
side_venv_check "$side" test_triton_release "triton=$version"
cd "$root"
"$side/bin/python" -m pytest -q -p no:cacheprovider \
    tests/kernels/triton/test_triton_compile.py tests/kernels/triton/test_sass_check.py
