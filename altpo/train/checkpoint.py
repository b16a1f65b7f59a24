"""Atomic, pickle-free training checkpoints and the final model folder.

Layout of an output folder::

    OUTPUT/
      config.json, model.safetensors, tokenizer files   the final model (save_pretrained)
      train_config.json                                   the settings of the run
      metrics.jsonl                                       one JSON object per optimizer step
      reference_logprobs.safetensors                      the reference cache (default place)
      .altpo-run.json                                     what runs wrote here (--overwrite removes it)
      checkpoints/step-00000050/
        config.json, model.safetensors, tokenizer files   the weights at that step
        trainer_state.safetensors                         optimizer state, master weights, RNG
        trainer_state.json                                step, epoch, schedule, settings, keys
        metrics.jsonl                                     the run's records up to this step

A checkpoint is written into a temporary folder beside its final name and renamed when complete,
so an interrupted save never leaves a checkpoint that looks whole. Every file and the folder are
fsynced before the rename and the parent folder after it, so a power loss cannot leave a renamed
checkpoint whose files are not on disk. ``manifest.json`` (written last) records every file's size;
:func:`checkpoint_problem` checks it, the JSON files and the safetensors headers, and resume skips a
checkpoint that fails. Everything is safetensors or JSON; nothing is pickled.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from altpo.model.saving import make_folder_portable
from altpo.train.finite_weights import check_finite_weights

CHECKPOINTS = "checkpoints"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
MANIFEST = "manifest.json"
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
    make_folder_portable(folder)  # loadable by transformers 4.45+ too (open-unlearning's pin)


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a folder's data and metadata to the disk."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file in ``folder`` (recursively), then the folders themselves."""
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def _no_space(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)  # safetensors wraps the OS error in its own exception
    return "No space left" in text or "os error 28" in text or "Disk quota" in text


def save_checkpoint(output_dir: str | Path, step: int, *, model, tokenizer,
                    tensors: dict[str, torch.Tensor], state: dict, keep: int | None = None) -> Path:
    """Write checkpoint ``step`` atomically and durably, then prune all but the newest ``keep``."""
    from altpo.errors import UserError

    final = checkpoint_dir(output_dir, step)
    created_parent = not final.parent.exists()
    final.parent.mkdir(parents=True, exist_ok=True)
    if created_parent:
        fsync_path(final.parent.parent)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _save_model_folder(tmp, model, tokenizer)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(state, indent=2, sort_keys=True))
        copy_metrics_history(output_dir, tmp, step)
        sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": sizes}, indent=2))
        fsync_tree(tmp)
        old = None
        if final.exists():  # a checkpoint of this step from a run that was rolled back
            old = final.with_name(f".tmp-old-{final.name}-{os.getpid()}")
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_path(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if _no_space(err):
            raise UserError(
                f"no space left on the disk while writing checkpoint {final.name} in {final.parent}; "
                "the incomplete copy was removed and the newest complete checkpoint is still there. "
                "Free space, lower --keep-checkpoints, or raise --save-every, then continue with "
                "--resume") from None
        raise
    if keep is not None and keep > 0:
        for _, old_ckpt in list_checkpoints(output_dir)[:-keep]:
            # renamed first: a kill while deleting leaves a .tmp-* folder (removed at the next
            # start), never a half-deleted step-N
            doomed = old_ckpt.with_name(f".tmp-prune-{old_ckpt.name}-{os.getpid()}")
            os.rename(old_ckpt, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    return final


METRICS = "metrics.jsonl"


def metrics_records(path: Path) -> dict[int, str]:
    """``step -> line`` of every whole record in a metrics file (torn or damaged lines skipped;
    a step given twice keeps its first record)."""
    found: dict[int, str] = {}
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return found
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            found.setdefault(record["step"], line)
    return found


def copy_metrics_history(output_dir, folder: Path, step: int) -> None:
    """The run's metrics records up to ``step`` go into the checkpoint, so that ``--resume`` can
    restore a ``metrics.jsonl`` that was cut or damaged since."""
    records = metrics_records(Path(output_dir) / METRICS)
    lines = [records[s] for s in sorted(records) if s <= step]
    (folder / METRICS).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is not whole (bad header, or shorter/longer than its header says)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path.name} is truncated"
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            return f"{path.name} is truncated (header runs past the end)"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return f"{path.name} has a damaged header"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        return f"{path.name} holds {size} bytes where its header says {8 + n + end}"
    return None


def checkpoint_problem(path: str | Path) -> str | None:
    """Why checkpoint folder ``path`` cannot be resumed from, or None when it passes its check."""
    path = Path(path)
    try:
        manifest_path = path / MANIFEST
        if manifest_path.is_file():
            listed = json.loads(manifest_path.read_text())["files"]
            for name, size in listed.items():
                f = path / name
                if not f.is_file():
                    return f"{name} is missing"
                if f.stat().st_size != size:
                    return f"{name} holds {f.stat().st_size} bytes, {size} were written"
        for name in (STATE_JSON, "config.json"):
            if not isinstance(json.loads((path / name).read_text()), dict):
                return f"{name} is not a JSON object"
        if "step" not in json.loads((path / STATE_JSON).read_text()):
            return f"{STATE_JSON} has no step"
        for f in sorted(path.glob("*.safetensors")):
            problem = _safetensors_problem(f)
            if problem:
                return problem
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def usable_checkpoint(output_dir: str | Path, say=print) -> Path | None:
    """The newest checkpoint that passes :func:`checkpoint_problem`; newer ones that fail are
    renamed ``.broken-step-N`` (kept for inspection, never chosen again) and named."""
    for _, path in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        broken = path.with_name(f".broken-{path.name}")
        shutil.rmtree(broken, ignore_errors=True)
        os.rename(path, broken)
        say(f"checkpoint {path} fails its check ({problem}); skipped it (moved to {broken.name}), "
            "using the one before")
    return None


def remove_stale_temporaries(output_dir: str | Path) -> list[Path]:
    """Delete the ``.tmp-*`` folders and files that killed saves left behind; returns them.

    Call only while holding the output folder's lock: no other run can be writing them.
    """
    output_dir = Path(output_dir)
    found = list(output_dir.glob(".tmp-*")) + list((output_dir / CHECKPOINTS).glob(".tmp-*"))
    found += [p for p in output_dir.glob(".*.tmp-*") if not _pid_alive(p.name.rsplit("-", 1)[-1])]
    for p in found:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return found


def _pid_alive(text: str) -> bool:
    """Whether the process whose id ends a temporary file's name still runs (a shared cache)."""
    try:
        os.kill(int(text), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return int(text) != os.getpid()


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
        from altpo.train.run_manifest import record_files

        _save_model_folder(tmp, model, tokenizer)
        fsync_tree(tmp)
        record_files(output_dir, sorted(p.name for p in tmp.iterdir()))  # listed before moved in
        (output_dir / _FINAL_LAST).unlink(missing_ok=True)
        names = sorted(p.name for p in tmp.iterdir())
        for name in [n for n in names if n != _FINAL_LAST] + [_FINAL_LAST]:
            if (tmp / name).exists():
                os.replace(tmp / name, output_dir / name)
        fsync_path(output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_run_outputs(output_dir: str | Path) -> list[str]:
    """Delete what earlier runs of this tool wrote in ``output_dir``, as their run manifest lists
    it (:mod:`altpo.train.run_manifest`); nothing else. The reference cache is kept."""
    from altpo.train.run_manifest import remove_listed

    return remove_listed(output_dir)


class Checkpoints:
    """The run's checkpoints: ``save(step)`` writes one through the scale-out strategy (its
    weights checked finite first, its JSON state saying where the run stands); ``last`` is the
    newest one written (or resumed from), which error messages name."""

    def __init__(self, scale, out: Path, model, tokenizer, optimizer, config, schedule,
                 reference_key: str | None, inputs: dict, dist, last: Path | None = None):
        self.scale, self.out, self.model, self.tokenizer = scale, out, model, tokenizer
        self.optimizer, self.config, self.schedule = optimizer, config, schedule
        self.reference_key, self.inputs, self.dist = reference_key, inputs, dist
        self.last = last

    def state(self, step: int) -> dict:
        """``state.json``: the step, the schedule, the data position, the settings and inputs."""
        schedule = self.schedule
        return {"step": step, "epoch": step / schedule.steps_per_epoch,
                "total_steps": schedule.total_steps, "warmup_steps": schedule.warmup_steps,
                "lr_next": schedule.lr_at(step),
                "data_position": {"epoch": step // schedule.steps_per_epoch,
                                  "step_in_epoch": step % schedule.steps_per_epoch},
                "settings": self.config.to_dict(), "reference_key": self.reference_key,
                "inputs": self.inputs, "master_weights": self.optimizer.mode}

    def save(self, step: int) -> Path | None:
        """Checkpoint ``step`` (on every process); the folder, or None on a process that wrote
        nothing (ranks other than 0 without FSDP)."""
        check_finite_weights(self.model, step, f"checkpoint step-{step:08d}", self.last)
        path = self.scale.save_checkpoint(self.out, step, self.model, self.tokenizer, self.optimizer,
                                          self.state(step), self.config.keep_checkpoints or None,
                                          self.dist)
        self.last = path or self.last
        return path
