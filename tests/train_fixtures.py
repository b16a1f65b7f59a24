"""The trainer tests' tiny Llama and settings (kept for ``from train_fixtures import``; the
definitions live in helpers.py)."""

from helpers import (  # noqa: F401
    ALTERNATES,
    FORGET_ROWS,
    RETAIN_ROWS,
    base_settings,
    build_model_folder,
    sequence_logprob_float64,
)
