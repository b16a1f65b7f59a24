"""What several test files share, one copy each (tests/ is on sys.path: ``from helpers import ...``).

- where the repository and its TOFU fixture are (``REPO_ROOT``, ``TOFU_FIXTURE``);
- the trainer tests' tiny Llama on the fixture's forget01/retain99 rows and their settings
  (``build_model_folder``, ``base_settings``), behind the ``model_dir`` fixture of conftest.py;
- a float64 reference log-prob from a stock forward (``sequence_logprob_float64``);
- the evaluation tests' tiny models on the first rows of TOFU splits (``tiny_tofu_tokenizer``,
  ``save_tiny_tofu_model``);
- launching ``torchrun`` from the repository root (``torchrun``, ``cli_flags``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Sequence

import torch

from altpo.data.tofu import load_alternates, load_tofu_split, texts_for_tokenizer
from altpo.eval.tofu import load_tofu_rows
from altpo.model.tiny_llama import build_tiny_llama, build_tiny_tokenizer, save_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]
TOFU_FIXTURE = REPO_ROOT / "fixtures" / "tofu"   # a small part of TOFU (fixtures/tofu/SOURCES.md)

# ------------------------------------------------------------------------------------------------
# The trainer tests' tiny Llama. The tokenizer is trained on the rows the tests use; the model is
# saved and reloaded through ``from_pretrained`` by the trainer, like a real checkpoint.

ALTERNATES = "alternates/llama2-7b/forget01/alt5_seed_0.json"
FORGET_ROWS, RETAIN_ROWS = 4, 24


def build_model_folder(tofu_dir: Path, folder: Path, *, chat_template: bool = True) -> Path:
    forget = load_tofu_split(tofu_dir, "forget01")
    retain = load_tofu_split(tofu_dir, "retain99")[:RETAIN_ROWS]
    alts = load_alternates(tofu_dir / ALTERNATES, forget)
    texts = texts_for_tokenizer(forget[:FORGET_ROWS] + retain, alts[:FORGET_ROWS])
    tokenizer = build_tiny_tokenizer(texts, vocab_size=700, chat_template=chat_template)
    model = build_tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                             intermediate_size=64, seed=5)
    save_tiny_model(model, tokenizer, folder)
    return folder


def base_settings(tofu_dir: Path, model_dir: Path, output: Path, **overrides) -> dict:
    settings = dict(
        model=str(model_dir), data=str(tofu_dir), forget_split="forget01", retain_split="retain99",
        alternates=str(tofu_dir / ALTERNATES), max_forget_rows=FORGET_ROWS,
        max_retain_rows=RETAIN_ROWS, output=str(output), batch_size=4, max_steps=3, lr=3e-3,
        warmup_epochs=0.0, tokens_per_microbatch="1024", quiet=True, loss_backend="torch",
        attention="sdpa", device="cpu",
    )
    settings.update(overrides)
    return settings


def sequence_logprob_float64(model, ids, labels) -> float:
    """Summed answer log-prob of one sequence from a stock forward and float64 log-softmax."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    target = torch.tensor(labels[1:])
    mask = target != -100
    lp = torch.log_softmax(logits, -1).gather(1, target.clamp(min=0)[:, None])[:, 0]
    return float((lp * mask).sum())


# ------------------------------------------------------------------------------------------------
# The evaluation tests' tiny models: a tokenizer trained on every text field of the first rows of
# some TOFU splits, and tiny random Llamas saved with it.


def tiny_tofu_tokenizer(splits: Sequence[str], rows: int, *, vocab_size: int = 400,
                        extra_texts: Iterable[str] = (), tofu_dir: Path = TOFU_FIXTURE):
    texts = list(extra_texts)
    for split in splits:
        for row in load_tofu_rows(tofu_dir, split, rows):
            texts += [v for v in row.values() if isinstance(v, str)]
    return build_tiny_tokenizer(texts, vocab_size=vocab_size)


def save_tiny_tofu_model(tokenizer, folder: Path, seed: int, *, hidden_size: int = 32,
                         num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                         intermediate_size: int = 64) -> Path:
    model = build_tiny_llama(tokenizer, hidden_size=hidden_size, num_layers=num_layers,
                             num_heads=num_heads, num_kv_heads=num_kv_heads,
                             intermediate_size=intermediate_size, seed=seed)
    save_tiny_model(model, tokenizer, folder)
    return folder


# ------------------------------------------------------------------------------------------------
# torchrun


def cli_flags(settings: dict) -> list[str]:
    """``--flag value`` for each setting (``--flag`` alone for True; False and None left out)."""
    args = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False and value is not None:
            args += [flag, str(value)]
    return args


def launch_env(*, pythonpath: bool = True) -> dict:
    """The environment of a launched process: one CPU thread per process, no inherited
    ``WORLD_SIZE``; the repository on ``PYTHONPATH`` unless ``pythonpath`` is False (then any
    inherited ``PYTHONPATH`` is dropped too)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    if pythonpath:
        env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def torchrun(*args: str, nproc: int = 2, timeout: float = 300, pythonpath: bool = True,
             check: bool = True) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node NPROC ARGS`` from the
    repository root (e.g. ``torchrun("-m", "altpo.cli", "train", *cli_flags(settings))``); with
    ``check``, a failure shows the end of its stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           *args]
    proc = subprocess.run(cmd, env=launch_env(pythonpath=pythonpath), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
