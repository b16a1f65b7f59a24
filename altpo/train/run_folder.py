"""The run's output folder: what it holds, whether a run may start in it, and its metrics file.

A folder holds one run: ``train_config.json``, ``metrics.jsonl`` (one record per step),
``checkpoints/step-N`` (resumable state), ``reference_logprobs.safetensors`` (the cached
reference), ``train_summary.json`` and, when the run completed, the ``save_pretrained`` model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from altpo.errors import UserError
from altpo.train.checkpoint import (
    checkpoint_dir,
    list_checkpoints,
    metrics_records,
    remove_run_outputs,
    usable_checkpoint,
)
from altpo.train.config import TRAJECTORY_SETTINGS, TrainConfig
from altpo.train.input_fingerprints import PATH_SETTINGS
from altpo.train.run_manifest import RUN_MANIFEST, start_run, unlisted_model_files

REF_CACHE_NAME = "reference_logprobs.safetensors"

METRICS_NAME = "metrics.jsonl"

CONFIG_NAME = "train_config.json"

SUMMARY_NAME = "train_summary.json"


def check_output_folder(out: Path, config: TrainConfig, say=print) -> Path | None:
    """The checkpoint to resume from (None for a fresh run); raises when the folder is not usable.

    On ``--resume`` a newest checkpoint that fails its check is skipped (and named) for the one
    before. Paths (model, data, alternates) may change between runs: their contents are compared
    by fingerprint once loaded (:mod:`altpo.train.input_fingerprints`)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} exists and is a file, not a folder; choose a folder")
    earlier_run = out.is_dir() and any(
        (out / name).exists() for name in ("config.json", "checkpoints", METRICS_NAME, CONFIG_NAME))
    foreign = unlisted_model_files(out) if out.is_dir() else []
    if foreign and not config.resume:
        # a model this tool did not write (or wrote before runs kept a manifest): never emptied
        raise UserError(f"--output {out}{_link_note(out)} holds a model that no run of this tool "
                        f"wrote ({', '.join(foreign[:4])}; no {RUN_MANIFEST} lists them: another "
                        "model, or a run of a version that kept no manifest); a run there would "
                        "replace it, and --overwrite removes only files a run listed in its manifest. "
                        "Choose another --output (an empty or new folder), or move the model away")
    if config.resume:
        had_any = bool(list_checkpoints(out))
        ckpt = usable_checkpoint(out, say)
        if ckpt is None:
            if had_any:
                raise UserError(f"--resume: no checkpoint in {out}/checkpoints passes its check (see "
                                "above); start over with --overwrite")
            raise UserError(f"--resume: no checkpoint in {out}/checkpoints; start without --resume "
                            "(checkpoints are written with --save-every N and on interruption)")
        state = json.loads((ckpt / "trainer_state.json").read_text())
        saved = state.get("settings", {})
        compared = [k for k in TRAJECTORY_SETTINGS
                    if not (k in PATH_SETTINGS and "inputs" in state)]  # contents compared later
        changed = [k for k in compared if k in saved and saved[k] != getattr(config, k)]
        if changed:
            detail = ", ".join(f"{k}: {saved[k]!r} -> {getattr(config, k)!r}" for k in changed[:5])
            raise UserError(f"--resume: settings differ from the checkpoint's ({detail}); resume with "
                            f"the same settings, or start a new run in another --output")
        check_metrics_history(out, ckpt, int(state["step"]), say)
        return ckpt
    if earlier_run and not config.overwrite:
        raise UserError(f"--output {out}{_link_note(out)} already holds a run of this tool "
                        f"({_describe_run(out)}); add --resume to continue it, --overwrite to start "
                        "over (removes only that run's files), or choose another folder")
    return None


def _link_note(out: Path) -> str:
    return f" (a link to {out.resolve()})" if out.is_symlink() else ""


def _describe_run(out: Path) -> str:
    parts = []
    steps = [s for s, _ in list_checkpoints(out)]
    if steps:
        parts.append(f"checkpoints up to step {steps[-1]}")
    if (out / "config.json").exists():
        parts.append("a finished model")
    elif (out / METRICS_NAME).exists():
        parts.append(METRICS_NAME)
    return ", ".join(parts) or CONFIG_NAME


def checkpoint_master_mode(checkpoint: Path | None) -> str | None:
    """The master-weights mode a checkpoint's optimizer state was saved in."""
    if checkpoint is None:
        return None
    return json.loads((checkpoint / "trainer_state.json").read_text()).get("master_weights")


def _ranges(steps) -> str:
    steps, parts = sorted(steps), []
    for s in steps:
        if parts and s == parts[-1][1] + 1:
            parts[-1][1] = s
        else:
            parts.append([s, s])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts[:6]) + (", ..." if len(parts) > 6 else "")


def check_metrics_history(out: Path, checkpoint: Path, step: int, say=print) -> None:
    """On ``--resume``: say what happens to ``metrics.jsonl`` (records after the checkpoint are
    redone; missing ones come back from the checkpoint's copy), or refuse when records up to the
    checkpoint are missing and the checkpoint has no copy. Changes nothing."""
    path = out / METRICS_NAME
    records = metrics_records(path)
    later = [s for s in records if s > step]
    if later:
        say(f"resume: {len(later)} record(s) of {METRICS_NAME} after step {step} (steps "
            f"{_ranges(later)}) are dropped: those steps are trained again")
    missing = [s for s in range(1, step + 1) if s not in records]
    if not missing:
        return
    copy = checkpoint / METRICS_NAME
    saved = metrics_records(copy)
    if copy.is_file() and all(s in saved for s in range(1, step + 1)):
        say(f"resume: {METRICS_NAME} lacks the records of steps {_ranges(missing)} (cut or damaged); "
            f"restoring them from {checkpoint.name}")
        return
    if not path.exists():
        say(f"resume: {METRICS_NAME} is absent and {checkpoint.name} has no copy of it; the history "
            f"starts at step {step + 1}")
        return
    raise UserError(
        f"--resume: {METRICS_NAME} lacks the records of steps {_ranges(missing)} up to the checkpoint "
        f"at step {step} (cut or damaged), and {checkpoint.name} holds no copy to restore them from. "
        f"Restore {METRICS_NAME} from a backup, or move it aside to continue with a history that "
        "starts after the checkpoint, or start over with --overwrite")


def trim_metrics(path: Path, keep_up_to: int) -> None:
    """On resume, keep the records up to the checkpoint's step (from the checkpoint's copy when the
    file lost some) and drop the later ones (they will be redone). The file is replaced atomically."""
    if keep_up_to == 0:
        path.unlink(missing_ok=True)
        return
    records = metrics_records(path)
    if any(s not in records for s in range(1, keep_up_to + 1)):
        saved = metrics_records(checkpoint_dir(path.parent, keep_up_to) / METRICS_NAME)
        if all(s in saved for s in range(1, keep_up_to + 1)):
            records = saved
    if not path.exists() and not records:
        return
    kept = [records[s] for s in sorted(records) if s <= keep_up_to]
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def start_outputs(out: Path, config: TrainConfig, rank: int, start_step: int) -> None:
    """Only once everything loaded is anything changed on disk (rank 0): ``--overwrite`` removes
    the earlier run's outputs, the run manifest and ``config.json`` are written, and on resume the
    metrics are trimmed to the checkpoint's step."""
    if rank != 0:
        return
    if config.overwrite:
        remove_run_outputs(out)
    out.mkdir(parents=True, exist_ok=True)
    start_run(out)  # the run manifest: what --overwrite may remove later
    (out / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2))
    trim_metrics(out / METRICS_NAME, start_step)
