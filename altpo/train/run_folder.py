"""The run's output folder: what it holds, whether a run may start in it, and its metrics file.

A folder holds one run: ``train_config.json``, ``metrics.jsonl`` (one record per step),
``checkpoints/step-N`` (resumable state), ``reference_logprobs.safetensors`` (the cached
reference), ``train_summary.json`` and, when the run completed, the ``save_pretrained`` model.
"""

from __future__ import annotations

import json
from pathlib import Path

from altpo.errors import UserError
from altpo.train.checkpoint import list_checkpoints, usable_checkpoint
from altpo.train.config import TRAJECTORY_SETTINGS, TrainConfig
from altpo.train.input_fingerprints import PATH_SETTINGS
from altpo.train.run_manifest import unlisted_model_files

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
                        f"wrote ({', '.join(foreign[:4])}); a run there would replace it, and "
                        "--overwrite removes only files a run listed in its manifest. Choose another "
                        "--output (an empty or new folder)")
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


def trim_metrics(path: Path, keep_up_to: int) -> None:
    """On resume, drop records of steps after the checkpoint (they will be redone)."""
    if not path.exists():
        return
    if keep_up_to == 0:
        path.unlink()
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line torn by a kill (or power loss) while it was appended
            continue
        if isinstance(record, dict) and record.get("step", 0) <= keep_up_to:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))
