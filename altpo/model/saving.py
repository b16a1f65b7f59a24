"""Model folders that older transformers releases load too (open-unlearning pins 4.45.1).

transformers 5.x writes ``"tokenizer_class": "TokenizersBackend"`` (a class 4.x does not have),
the extra special tokens as ``extra_special_tokens``, the chat template only as
``chat_template.jinja`` and the RoPE settings only inside ``rope_parameters``. After saving,
:func:`make_folder_portable` adds what 4.x reads, without removing what 5.x reads:
``PreTrainedTokenizerFast`` (the same tokenizer.json-backed class; 5.x maps it to
``TokenizersBackend``), ``additional_special_tokens``, ``chat_template`` in tokenizer_config.json,
and ``rope_theta`` / ``rope_scaling`` / ``torch_dtype`` in config.json.

A LoRA adapter folder (``adapter_config.json``) gets the same care for peft:
:func:`make_adapter_portable` drops the keys newer peft releases add while they hold their default
(peft 0.13, of transformers 4.45's time, refuses any key it does not know).
"""

from __future__ import annotations

import json
from pathlib import Path

# tokenizer classes of transformers 5.x that 4.x does not know, and the class 4.x has for them
_NEW_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def _rewrite_json(path: Path, edit) -> None:
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    if edit(data):
        from altpo.eval.output import write_atomic  # its own temporary name, fsynced, renamed

        write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


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


# The keys of a LoRA adapter_config.json that peft 0.13.2 (the release of transformers 4.45's time)
# accepts; LoraConfig(**kwargs) there refuses any other key.
PEFT_013_LORA_KEYS = frozenset({
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out",
    "inference_mode", "init_lora_weights", "layer_replication", "layers_pattern",
    "layers_to_transform", "loftq_config", "lora_alpha", "lora_dropout", "megatron_config",
    "megatron_core", "modules_to_save", "peft_type", "r", "rank_pattern", "revision",
    "runtime_config", "target_modules", "task_type", "use_dora", "use_rslora",
})
# written by newer peft as a note only (which release saved the folder); no setting
_PEFT_NOTE_KEYS = ("peft_version",)


def _lora_defaults() -> dict:
    """LoraConfig's default of each field, as JSON would hold it (fields without one are left out)."""
    import dataclasses

    from peft import LoraConfig

    found = {}
    for f in dataclasses.fields(LoraConfig):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        try:
            found[f.name] = json.loads(json.dumps(value))
        except (TypeError, ValueError):
            continue
    return found


def make_adapter_portable(folder) -> None:
    """Let peft 0.13+ load a LoRA adapter folder that a newer peft wrote (idempotent).

    A key older releases do not know is dropped only when it holds its default (an older release
    then behaves as that default does) or is the version note; one with any other value stays, so
    an old release refuses the adapter rather than silently ignoring a setting.
    """
    folder = Path(folder)

    def edit(cfg: dict) -> bool:
        if cfg.get("peft_type") != "LORA":
            return False
        defaults = _lora_defaults()
        drop = [k for k in cfg if k not in PEFT_013_LORA_KEYS
                and (k in _PEFT_NOTE_KEYS or (k in defaults and cfg[k] == defaults[k]))]
        for k in drop:
            del cfg[k]
        return bool(drop)

    _rewrite_json(folder / "adapter_config.json", edit)
