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
peft_version="0.13.2"   # the peft release of transformers 4.45's time, for the LoRA adapter
side="$root/.venv-tf445"
bash "$root/scripts/with-env.sh" true    # .venv, made or checked
source "$root/scripts/side-venv.sh"
# installed before .venv is put on the path, so pip resolves transformers' own dependencies here
# peft without its dependencies (torch, accelerate): those come from .venv
side_venv_make "$side" test_transformers_445 base-last "transformers==$version" -- --no-deps "peft==$peft_version"
side_venv_check "$side" test_transformers_445 "transformers=$version" tokenizers "peft=$peft_version"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$root"
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" bash scripts/with-env.sh python scripts/check_old_transformers.py write "$work/folders"
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$side/bin/python" scripts/check_old_transformers.py load "$work/folders"
