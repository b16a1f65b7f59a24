"""Loading a causal LM and its tokenizer for the commands that run a model (eval,
generate-alternates): source checks that fail before anything heavy loads, device and dtype
choice, ``from_pretrained``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .cli import UserError

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def check_model_source(source: str, flag: str = "--model") -> None:
    """A local folder must exist and hold a transformers ``config.json``; an ``owner/name`` that
    is not a local path is taken as a hub id and checked when loading."""
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"{flag} {source} has no config.json: pass a folder written by save_pretrained "
                "(config.json, weights, tokenizer files) or a hub model id"
            )
        return
    if path.exists():
        raise UserError(f"{flag} {source} is a file; pass the model folder (the one holding config.json)")
    if not _HUB_ID.match(str(source)):
        raise UserError(f"{flag} {source} does not exist; pass a model folder written by save_pretrained")


def resolve_device(name: str = "auto"):
    """``auto``: CUDA when available, else the CPU."""
    import torch

    if name not in DEVICES and not str(name).startswith("cuda:"):
        raise UserError(f"--device must be one of {', '.join(DEVICES)} (or cuda:N), got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} requested but no CUDA device is visible; use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str, device):
    """``auto``: bfloat16 on a GPU that supports it, float32 otherwise."""
    import torch

    if name not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def load_model_and_tokenizer(source: str, *, device: str = "auto", dtype: str = "auto",
                             tokenizer_source: str | None = None):
    """``(model, tokenizer)`` from a folder or hub id, the model in eval mode on ``device``."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    # transformers renamed torch_dtype to dtype in 4.56
    dtype_kw = {"dtype": dt} if (major, minor) >= (4, 56) else {"torch_dtype": dt}
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source or source)
        model = AutoModelForCausalLM.from_pretrained(source, **dtype_kw)
    except OSError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot load the model from {source}: {first}") from None
    model.to(dev)
    model.eval()
    return model, tokenizer


def add_model_arguments(parser) -> None:
    """The flags every command that loads a model for inference shares: device, dtype, template."""
    from .tofu_data import DEFAULT_DATE_STRING, DEFAULT_SYSTEM_PROMPT

    parser.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICES)} or cuda:N (default auto)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="model weights dtype (default auto: bfloat16 on a GPU, float32 on the CPU)")
    parser.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT,
                        help=f"chat template system prompt ('' for none; default {DEFAULT_SYSTEM_PROMPT!r})")
    parser.add_argument("--date-string", default=DEFAULT_DATE_STRING,
                        help=f"chat template date string (default {DEFAULT_DATE_STRING!r})")
