"""Atomic, pickle-free training checkpoints and the final model folder.

Layout of an output folder::

    OUTPUT/
      config.json, model.safetensors, tokenizer files   the final model (save_pretrained)
      train_config.json                                   the settings of the run
      metrics.jsonl                                       one JSON object per optimizer step
      reference_logprobs.safetensors                      the reference cache (default place)
      checkpoints/step-00000050/
        config.json, model.safetensors, tokenizer files   the weights at that step
        trainer_state.safetensors                         optimizer state, master weights, RNG
        trainer_state.json                                step, epoch, schedule, settings, keys

A checkpoint is written into a temporary folder beside its final name and renamed when complete,
so an interrupted save never leaves a checkpoint that looks whole. Everything is safetensors or
JSON; nothing is pickled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir`` as ``(step, path)``, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / STATE_JSON).is_file() and (p / STATE_TENSORS).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def rng_state_tensors() -> dict[str, torch.Tensor]:
    """torch's CPU and CUDA generator states as tensors."""
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def restore_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    if "rng.cpu" in tensors:
        torch.set_rng_state(tensors["rng.cpu"])
    cuda = sorted((int(k.rsplit(".", 1)[1]), v) for k, v in tensors.items() if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        states = [v for _, v in cuda][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)


def _save_model_folder(folder: Path, model, tokenizer) -> None:
    model.save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def save_checkpoint(output_dir: str | Path, step: int, *, model, tokenizer,
                    tensors: dict[str, torch.Tensor], state: dict, keep: int | None = None) -> Path:
    """Write checkpoint ``step`` atomically and prune all but the newest ``keep`` ones."""
    final = checkpoint_dir(output_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _save_model_folder(tmp, model, tokenizer)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(state, indent=2, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None and keep > 0:
        for _, old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint_state(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(state JSON, state tensors)`` of a checkpoint folder."""
    path = Path(path)
    state = json.loads((path / STATE_JSON).read_text())
    tensors = load_file(str(path / STATE_TENSORS))
    return state, tensors


def load_model_weights(model, folder: str | Path) -> None:
    """Load a ``save_pretrained`` folder's safetensors weights into ``model`` in place, exactly.

    Tied weights that ``save_pretrained`` stores once are accepted as missing when they share
    storage with a loaded tensor.
    """
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        weights.update(load_file(str(folder / name)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint {folder} has weights the model lacks: {unexpected[:3]}")
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ptrs = {params[n].data_ptr() for n in weights if n in params}
    really_missing = [n for n in missing if n not in params or params[n].data_ptr() not in loaded_ptrs]
    if really_missing:
        raise ValueError(f"checkpoint {folder} lacks weights: {really_missing[:3]}")


_FINAL_LAST = "config.json"


def save_final_model(output_dir: str | Path, model, tokenizer) -> None:
    """The final ``save_pretrained`` folder, written beside and moved in with ``config.json`` last.

    ``from_pretrained`` needs ``config.json``, so until the last rename the folder does not look
    like a model; once it is there, every weight file already is.
    """
    output_dir = Path(output_dir)
    tmp = output_dir / f".tmp-final-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _save_model_folder(tmp, model, tokenizer)
        (output_dir / _FINAL_LAST).unlink(missing_ok=True)
        names = sorted(p.name for p in tmp.iterdir())
        for name in [n for n in names if n != _FINAL_LAST] + [_FINAL_LAST]:
            if (tmp / name).exists():
                os.replace(tmp / name, output_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


MODEL_FILE_PATTERNS = ("config.json", "generation_config.json", "model.safetensors",
                       "model-*.safetensors", "model.safetensors.index.json", "tokenizer*.json",
                       "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt")


def remove_run_outputs(output_dir: str | Path) -> None:
    """Delete what a previous run wrote (model files, checkpoints, metrics); keep the reference cache."""
    output_dir = Path(output_dir)
    shutil.rmtree(output_dir / CHECKPOINTS, ignore_errors=True)
    for pattern in MODEL_FILE_PATTERNS + ("metrics.jsonl", "train_config.json", "train_summary.json"):
        for p in output_dir.glob(pattern):
            if p.is_file():
                p.unlink()
