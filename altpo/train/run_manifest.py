"""What a run wrote into its output folder, and the rule that keeps every input model safe.

``OUTPUT/.altpo-run.json`` lists every file and folder a run of this tool wrote there (its own
files when it starts, the final model's files before they are moved in). ``--overwrite`` removes
exactly what that list names, and nothing else: a folder that holds a model no run of this tool
wrote is never emptied. ``--output`` may not be, lie inside or contain ``--model`` or
``--tokenizer``: the final save would replace the model it trains.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from altpo.errors import UserError

RUN_MANIFEST = ".altpo-run.json"

# written by every run; the reference cache is left out on purpose (--overwrite keeps it: it is
# keyed by the model's and the data's fingerprints and checked before it is used)
RUN_FILES = ("train_config.json", "metrics.jsonl", "train_summary.json", "checkpoints", "evals",
             "best", "adapter")

# what a save_pretrained model folder holds: a folder with any of these is "a model"
MODEL_MARKERS = ("config.json", "model.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "adapter_config.json")


def _manifest_path(out: Path) -> Path:
    return Path(out) / RUN_MANIFEST


def listed_files(out: str | Path) -> list[str] | None:
    """The names the run manifest of ``out`` lists, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads(_manifest_path(Path(out)).read_text())
        files = data["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return files


def record_files(out: str | Path, names) -> None:
    """Add ``names`` (plain names inside ``out``) to its run manifest, atomically and durably.

    Call before the files are written: a kill between the two leaves a name whose file is
    missing (harmless), never a run file that the manifest does not list."""
    from altpo import __version__

    out = Path(out)
    files = list(dict.fromkeys((listed_files(out) or []) + [str(n) for n in names]))
    tmp = out / f".tmp-run-manifest-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"written_by": f"altpo-fast {__version__}", "files": files}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, _manifest_path(out))
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def start_run(out: str | Path) -> None:
    """Record the run's own files before the first of them is written."""
    record_files(out, RUN_FILES)


def unlisted_model_files(out: str | Path) -> list[str]:
    """Model files in ``out`` that no run manifest lists (a model this tool did not write)."""
    out = Path(out)
    listed = set(listed_files(out) or [])
    found = [n for n in MODEL_MARKERS if (out / n).exists()]
    found += sorted(p.name for p in out.glob("model-*.safetensors"))
    return [n for n in found if n not in listed]


def remove_listed(out: str | Path) -> list[str]:
    """Delete what the run manifest of ``out`` lists; returns the names removed."""
    out = Path(out)
    removed = []
    for name in listed_files(out) or []:
        if "/" in name or name in ("", ".", "..") or name == RUN_MANIFEST:
            continue  # only plain names inside the folder
        p = out / name
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)
        else:
            continue
        removed.append(name)
    _manifest_path(out).unlink(missing_ok=True)
    return removed


def _folder(value) -> Path | None:
    if not value:
        return None
    p = Path(os.path.expanduser(str(value)))
    return p.resolve() if p.exists() else None


def check_output_is_not_an_input(config) -> None:
    """Refuse an ``--output`` that is, lies inside or contains ``--model`` or ``--tokenizer`` (also
    through a link), with or without ``--overwrite``."""
    out = Path(os.path.expanduser(str(config.output))).resolve()
    for flag, value in (("--model", config.model), ("--tokenizer", getattr(config, "tokenizer", None))):
        source = _folder(value)
        if source is None:
            continue
        if out == source:
            how = "is"
        elif source in out.parents:
            how = "lies inside"
        elif out in source.parents:
            how = "contains"
        else:
            continue
        raise UserError(f"--output {config.output} {how} {flag} {value}: the run writes and (with "
                        f"--overwrite) removes files there, which would destroy its own input; choose "
                        "an --output outside the input folders")
