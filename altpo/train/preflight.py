"""Checks that run before anything heavy loads, so a mistake costs seconds, not a model load.

- the backends (``--loss-backend``, ``--attention``) against the device;
- ``--model``, ``--tokenizer`` and ``--data``: an existing folder, or a well-formed hub id (the one
  rule in :mod:`altpo.sources`); a hub id when the hub cannot be reached is served from the local
  cache without network retries, or refused at once;
- free disk space against one checkpoint plus the final model, sized from the model's config;
- stale ``.tmp-*`` folders that killed saves left in the output folder are removed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from altpo.errors import UserError
from altpo.sources import hub_reachable, local_path, looks_like_hub_id

GIB = 2**30


def preflight(config, dist, out: Path, say) -> None:
    check_backends(config, dist.device)
    check_learning_rate(config)
    check_sources(config)
    check_vocabulary(config)
    if dist.rank == 0:
        from altpo.train.checkpoint import remove_stale_temporaries

        stale = remove_stale_temporaries(out)
        if stale:
            say(f"removed {len(stale)} unfinished save(s) left by an earlier run that was killed: "
                f"{', '.join(p.name for p in stale[:4])}")
        check_disk_space(config, out, dist.device, say)


# ------------------------------------------------------------------------------------------------
# a learning rate that can move the weights

# An AdamW step moves a weight by about --lr. float32 resolves about 6e-8 of a weight's size, so
# below this a step changes no weight larger than 1e-3: every update rounds away and the run
# "finishes" having changed nothing.
SMALLEST_LR = 1e-10


def check_learning_rate(config) -> None:
    if 0 < config.lr < SMALLEST_LR:
        raise UserError(f"--lr {config.lr:g} is too small to change the weights: an AdamW step moves a "
                        f"weight by about the learning rate, and below {SMALLEST_LR:g} that rounds away "
                        "in float32 for every weight larger than 1e-3. Use a learning rate such as 1e-5")


# ------------------------------------------------------------------------------------------------
# the tokenizer against the model's embedding


def check_vocabulary(config) -> None:
    """Refuse a tokenizer with more tokens than the model's embedding has rows: their ids would
    index past the embedding. Read from config.json and the tokenizer, before the weights load."""
    from transformers import AutoConfig, AutoTokenizer

    model_src, tok_src = config.model, config.tokenizer or config.model
    try:
        rows = getattr(AutoConfig.from_pretrained(_source(model_src), trust_remote_code=False),
                       "vocab_size", None)
        tokens = len(AutoTokenizer.from_pretrained(_source(tok_src), trust_remote_code=False))
    except Exception:  # unreadable: the loads that follow name the problem
        return
    if isinstance(rows, int) and tokens > rows:
        flag = "--tokenizer" if config.tokenizer else "--model"
        raise UserError(f"{flag} {tok_src}: the tokenizer has {tokens} tokens but --model {model_src} has "
                        f"{rows} embedding rows (config.json vocab_size); ids from {rows} on would "
                        "index past the embedding. Use the tokenizer the model was trained with, or "
                        "resize the model's embeddings to the tokenizer")


def _source(name: str) -> str:
    path = local_path(name)
    return str(path) if path.is_dir() else name


# ------------------------------------------------------------------------------------------------
# backends


def check_backends(config, device) -> None:
    """``--loss-backend`` and ``--attention`` must run on ``device``."""
    from altpo_kernels.backends import resolve_backend

    try:
        resolve_backend(config.loss_backend, device)
    except ValueError as err:
        raise UserError(f"--loss-backend {config.loss_backend} cannot run on {device}: {err}; use "
                        "--loss-backend auto (or torch)") from None
    if config.attention != "auto":
        from altpo.model.packed_attention import available_backends

        available = available_backends(device)
        if config.attention not in available:
            raise UserError(f"--attention {config.attention} is not available on {device}; "
                            f"available: {', '.join(available)} (or auto)")


# ------------------------------------------------------------------------------------------------
# model, tokenizer and data sources


def check_sources(config) -> None:
    """Every source is an existing folder or a hub id; hub ids work offline only from the cache."""
    hub: list[tuple[str, str, str]] = []
    for flag, source, kind in (("--model", config.model, "model"),
                               ("--tokenizer", config.tokenizer, "model"),
                               ("--data", config.data, "dataset")):
        if source is None:
            continue
        path = local_path(source)
        if path.is_dir():
            if flag == "--model" and not (path / "config.json").is_file():
                raise UserError(f"--model {source}: no config.json in the folder; it must be a "
                                "save_pretrained model folder")
            continue
        if kind == "model" and path.exists():
            raise UserError(f"{flag} {source} is a file; pass the folder that holds config.json")
        if not looks_like_hub_id(source):
            what = ("a folder of TOFU split files" if kind == "dataset"
                    else "a save_pretrained folder")
            raise UserError(f"{flag} {source}: folder not found, and it is not a hub id of the "
                            f"form owner/name. Pass {what} or a hub id")
        hub.append((flag, source, kind))
    if not hub or hub_reachable(timeout=1.5):
        return
    missing = [(flag, source) for flag, source, kind in hub if not _in_hub_cache(source, kind)]
    if missing:
        listed = ", ".join(f"{flag} {source}" for flag, source in missing)
        extra = (" (--data defaults to the hub dataset locuslab/TOFU; pass a local folder of its "
                 "JSON Lines files, such as this repository's fixtures/tofu)" if any(f == "--data" for f, _ in missing) else "")
        raise UserError(f"the Hugging Face hub cannot be reached (offline, or HF_HUB_OFFLINE is "
                        f"set) and {listed} is not in the local cache{extra}; pass local folders "
                        "or connect to the network")
    _go_offline()


def _in_hub_cache(repo_id: str, kind: str) -> bool:
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / f"{kind}s--{repo_id.replace('/', '--')}"
    if kind == "dataset":
        datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", Path(constants.HF_HOME) / "datasets"))
        return folder.is_dir() or any(datasets_cache.glob(f"{repo_id.replace('/', '___')}*"))
    return (folder / "snapshots").is_dir()


def _go_offline() -> None:
    """Load hub ids from the cache only: no network retries when the hub is unreachable."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True
    except Exception:  # pragma: no cover - older huggingface_hub
        pass


# ------------------------------------------------------------------------------------------------
# disk space


def parameter_count(model_source: str) -> int | None:
    """Parameters of the model ``model_source`` describes, from its config alone (meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(str(local_path(model_source)) if local_path(model_source).is_dir()
                                         else model_source, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
    except Exception:  # an unknown architecture: the load itself will say so
        return None
    return sum(p.numel() for p in model.parameters())


def space_needed(num_params: int, weight_bytes: int, master_weights: str) -> tuple[int, int]:
    """``(one checkpoint, the final model)`` in bytes for ``num_params`` weights."""
    state = 8 if weight_bytes == 4 else (6 if master_weights == "kahan" else
                                         4 if master_weights == "none" else 12)
    return num_params * (weight_bytes + state), num_params * weight_bytes


def check_disk_space(config, out: Path, device, say) -> None:
    """Refuse a run whose output disk cannot hold one checkpoint and the final model."""
    from altpo.train.memory import train_dtype

    n = parameter_count(config.model)
    if n is None:
        return
    weight_bytes = train_dtype(config.dtype, device).itemsize
    checkpoint, final = space_needed(n, weight_bytes, config.master_weights)
    where = out if out.exists() else next(p for p in out.parents if p.exists())
    free = shutil.disk_usage(where).free
    need = checkpoint + final
    if free < need:
        raise UserError(
            f"--output {out}: {free / GIB:.2f} GiB free on its disk, but one checkpoint "
            f"({checkpoint / GIB:.2f} GiB for {n / 1e6:.1f}M parameters with optimizer state) plus "
            f"the final model ({final / GIB:.2f} GiB) need {need / GIB:.2f} GiB; free space or "
            "choose another --output")
    keep = config.keep_checkpoints or 0
    if config.save_every:
        most = ((keep or 1) + 1) * checkpoint + final  # a new checkpoint lands before pruning
        if free < most:
            say(f"warning: {free / GIB:.2f} GiB free on the disk of --output; --keep-checkpoints "
                f"{keep} with --save-every needs up to {most / GIB:.2f} GiB while a new checkpoint "
                "is written beside the kept ones (--keep-checkpoints 1 needs less)")
