#!/usr/bin/env bash
# Model folders this project writes (under the locked transformers 5.x) load in transformers 4.45.1,
# the release open-unlearning pins: tokenizer and model, checked by scripts/check_old_transformers.py.
#
#   bash scripts/test_transformers_445.sh
#
# The folders are written with .venv (scripts/with-env.sh makes it) and loaded in a side venv,
# .venv-tf445 (ignored by git, made once), that has transformers 4.45.1 and its own tokenizers and
# huggingface_hub, and takes torch from .venv. A failed install stops here with pip's output, and
# the versions imported are checked before the test.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="4.45.1"
side="$root/.venv-tf445"
bash "$root/scripts/with-env.sh" true    # .venv, made or checked
base_site="$("$root/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [ ! -x "$side/bin/python" ] || [ ! -f "$side/.installed" ]; then
    rm -rf "$side"
    python3 -m venv "$side"
    log="$(mktemp)"
    # installed before .venv is put on the path, so pip resolves transformers' own dependencies here
    if ! "$side/bin/python" -m pip install --disable-pip-version-check "transformers==$version" >"$log" 2>&1; then
        cat "$log" >&2
        echo "test_transformers_445: installing transformers $version failed" >&2
        exit 1
    fi
    rm -f "$log"
    site="$("$side/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$base_site" > "$site/zz_base_venv.pth"          # torch from .venv, after the side's own
    touch "$side/.installed"
fi
"$side/bin/python" - "$version" "$side" <<'PY'
import sys
import torch, tokenizers, transformers  # noqa: E401
want, side = sys.argv[1], sys.argv[2]
print("transformers", transformers.__version__, "tokenizers", tokenizers.__version__, "torch", torch.__version__)
if transformers.__version__ != want:
    sys.exit(f"test_transformers_445: expected transformers {want}, imported {transformers.__version__}")
for mod in (transformers, tokenizers):
    if not mod.__file__.startswith(side):
        sys.exit(f"test_transformers_445: {mod.__name__} imported from {mod.__file__}, not from {side}")
PY
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$root"
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" bash scripts/with-env.sh python scripts/check_old_transformers.py write "$work/folders"
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$side/bin/python" scripts/check_old_transformers.py load "$work/folders"
