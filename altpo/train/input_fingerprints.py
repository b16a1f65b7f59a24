"""Fingerprints of everything a run's trajectory depends on, kept in every checkpoint.

``--resume`` continues a run only when the inputs are the ones the checkpoint was trained on:
the model's weights, the forget and retain rows, the alternates, the chat template, the tokens
they make, the compute dtype and the settings. Contents are hashed, not paths, so a moved folder
resumes and a rewritten file at the same path does not.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

from altpo.errors import UserError
from altpo.train.config import TRAJECTORY_SETTINGS

# settings that name where an input lives: compared by content (fingerprint), not by string
PATH_SETTINGS = ("model", "tokenizer", "data", "alternates")


def _sha(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False,
                                     separators=(",", ":")).encode()).hexdigest()


def input_fingerprints(config, tokenizer, forget_rows: Sequence[dict], retain_rows: Sequence[dict],
                       alternates: Sequence[Sequence[str]], data, model_hash: str, dtype) -> dict[str, str]:
    """name -> sha256 of each input, as trained (after the row cuts); the settings are those
    whose fields say ``trajectory=True`` (:data:`altpo.train.config.TRAJECTORY_SETTINGS`)."""
    tokens = [[s.input_ids, s.labels] for s in data.forget + data.alternates + data.retain]
    settings = {k: getattr(config, k) for k in TRAJECTORY_SETTINGS if k not in PATH_SETTINGS}
    return {
        "model weights": model_hash,
        "forget split rows": _sha([[r["question"], r["answer"]] for r in forget_rows]),
        "retain split rows": _sha([[r["question"], r["answer"]] for r in retain_rows]),
        "alternates": _sha([list(a) for a in alternates]),
        "chat template": _sha([getattr(tokenizer, "chat_template", None), config.system_prompt,
                               config.date_string]),
        "tokens (tokenizer, template, --max-length)": _sha(tokens),
        "compute dtype": str(dtype),
        "settings": _sha(settings),
    }


def check_resume_inputs(checkpoint: Path, now: dict[str, str], say) -> None:
    """Refuse to resume from ``checkpoint`` when an input differs; list every one that does."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    saved = state.get("inputs")
    if saved is None:
        say(f"note: {checkpoint} records no input fingerprints (an older checkpoint); the inputs "
            "are not checked against it")
        return
    changed = [name for name in now if name in saved and saved[name] != now[name]]
    if changed:
        raise UserError(
            f"--resume: the inputs differ from those checkpoint {checkpoint.name} was trained on: "
            f"{', '.join(changed)} changed. Resuming would finish a run on mixed inputs; restore "
            "them, or start a new run (--overwrite, or another --output)")
