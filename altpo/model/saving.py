"""Model folders that older transformers releases load too (open-unlearning pins 4.45.1).

transformers 5.x writes ``"tokenizer_class": "TokenizersBackend"`` (a class 4.x does not have),
the extra special tokens as ``extra_special_tokens``, the chat template only as
``chat_template.jinja`` and the RoPE settings only inside ``rope_parameters``. After saving,
:func:`make_folder_portable` adds what 4.x reads, without removing what 5.x reads:
``PreTrainedTokenizerFast`` (the same tokenizer.json-backed class; 5.x maps it to
``TokenizersBackend``), ``additional_special_tokens``, ``chat_template`` in tokenizer_config.json,
and ``rope_theta`` / ``rope_scaling`` / ``torch_dtype`` in config.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# tokenizer classes of transformers 5.x that 4.x does not know, and the class 4.x has for them
_NEW_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def _rewrite_json(path: Path, edit) -> None:
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    if edit(data):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n",
                       encoding="utf-8")
        os.replace(tmp, path)


def _portable_tokenizer_config(folder: Path):
    def edit(cfg: dict) -> bool:
        changed = False
        cls = cfg.get("tokenizer_class")
        if cls in _NEW_TOKENIZER_CLASSES:
            cfg["tokenizer_class"] = _NEW_TOKENIZER_CLASSES[cls]
            changed = True
        extra = cfg.get("extra_special_tokens")
        if isinstance(extra, list) and extra and "additional_special_tokens" not in cfg:
            cfg["additional_special_tokens"] = list(extra)
            changed = True
        template = folder / "chat_template.jinja"
        if "chat_template" not in cfg and template.is_file():
            cfg["chat_template"] = template.read_text(encoding="utf-8")
            changed = True
        return changed
    return edit


def _portable_model_config(cfg: dict) -> bool:
    changed = False
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" in rope and "rope_theta" not in cfg:
            cfg["rope_theta"] = rope["rope_theta"]
            changed = True
        if rope.get("rope_type", "default") != "default" and "rope_scaling" not in cfg:
            cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
            changed = True
    if "dtype" in cfg and "torch_dtype" not in cfg:
        cfg["torch_dtype"] = cfg["dtype"]
        changed = True
    return changed


def make_folder_portable(folder) -> None:
    """Add to a ``save_pretrained`` folder what transformers 4.45+ needs to load it (idempotent)."""
    folder = Path(folder)
    _rewrite_json(folder / "tokenizer_config.json", _portable_tokenizer_config(folder))
    _rewrite_json(folder / "config.json", _portable_model_config)
