"""Loading a causal LM and its tokenizer for the commands that run a model (eval,
generate-alternates): source checks that fail before anything heavy loads, device and dtype
choice, ``from_pretrained``.
"""

from __future__ import annotations

import os
from pathlib import Path

from altpo.data.tofu import check_chat_template
from altpo.errors import UserError
from altpo.sources import looks_like_hub_id

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "bf16", "fp16", "fp32")
_TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


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
    if not looks_like_hub_id(source):
        raise UserError(f"{flag} {source} does not exist; pass a model folder written by save_pretrained "
                        "or a hub id of the form owner/name")


def resolve_device(name: str = "auto"):
    """``auto``: CUDA when available, else the CPU."""
    import torch  # here, not at the top: the commands' --help imports this module

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

    name = {v: k for k, v in _TORCH_DTYPE_NAMES.items()}.get(name, name)  # the old long names
    if name not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, _TORCH_DTYPE_NAMES[name])


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
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source or source, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=False, **dtype_kw)
    except Exception as err:  # missing files, pickled weights, unknown architectures, the hub
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot load the model from {source} ({type(err).__name__}: {first})") from None
    model.to(dev)
    model.eval()
    return model, tokenizer


def _pretrained_source(name: str, flag: str, *, needs_config: bool) -> str:
    """The string to hand ``from_pretrained``: an existing folder, or a hub id (``owner/name``)."""
    if looks_like_hub_id(name):
        return name
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise UserError(f"{flag} {name}: folder not found; pass a save_pretrained folder or a hub id "
                        "of the form owner/name")
    if needs_config and not (folder / "config.json").is_file():
        raise UserError(f"{flag} {name}: no config.json in the folder; it must be a "
                        "save_pretrained model folder")
    return str(folder)


def load_tokenizer(name: str, flag: str = "--model"):
    """The tokenizer of a folder or hub id, checked to have a chat template; errors name ``flag``."""
    from transformers import AutoTokenizer

    source = _pretrained_source(name, flag, needs_config=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except Exception as err:
        raise UserError(f"could not load a tokenizer from {flag} {name} ({type(err).__name__}: "
                        f"{first_line(err)})") from None
    check_chat_template(tokenizer, f"the tokenizer of {flag} {name}")
    return tokenizer


def load_causal_lm(name: str, dtype, flag: str = "--model"):
    """A causal LM on the CPU in ``dtype``, with the KV cache off (training runs packed rows)."""
    from transformers import AutoModelForCausalLM

    source = _pretrained_source(name, flag, needs_config=True)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=False,
                                                           output_loading_info=True)
    except Exception as err:
        raise UserError(f"could not load {flag} {name} ({type(err).__name__}: "
                        f"{first_line(err)})") from None
    check_loading_info(info, model, flag, name)
    model.config.use_cache = False
    return model


def check_loading_info(info: dict, model, flag: str, name: str) -> None:
    """Refuse a model whose weights did not all load: ``from_pretrained`` fills missing weights
    with random values and only warns, so a config.json that names the wrong architecture (or
    weights of another model) would train a random network."""
    missing = list(info.get("missing_keys") or [])
    unexpected = list(info.get("unexpected_keys") or [])
    mismatched = [k for k, *_ in (info.get("mismatched_keys") or [])]
    if not (missing or mismatched):
        return  # extra tensors alone (e.g. buffers older versions saved) leave every weight loaded
    parts = []
    for what, keys in (("missing from the files (they would start random)", missing),
                       ("in the files but not in the model", unexpected),
                       ("of another shape in the files", mismatched)):
        if keys:
            parts.append(f"{len(keys)} weight(s) {what}, e.g. {', '.join(sorted(keys)[:3])}")
    kind = type(model).__name__
    raise UserError(f"{flag} {name}: its weights do not fit the {kind} that its config.json describes "
                    f"({'; '.join(parts)}); check config.json's model_type and architecture, or "
                    "pass the folder the weights were saved with")


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""
