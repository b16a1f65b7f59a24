"""LoRA adapters through ``peft``: ``--lora-rank R``, ``--lora-alpha``, ``--lora-targets``.

The adapters go into the model in place (``get_peft_model``), after the reference log-probs were
computed with the base weights (or, under FSDP, computed with the adapters switched off), so the
cache is the base model's, shared with full-parameter runs. Only the adapter weights require
gradients; the optimizer and its exact-update modes see nothing else. The adapters keep the
model's dtype (bf16 on a GPU), their fp32 master weights live in the optimizer.

The output folder holds ``adapter/`` (``adapter_config.json``, ``adapter_model.safetensors``:
``PeftModel.from_pretrained(base, OUTPUT/adapter)`` loads it) and, with ``--merge``, the merged
model as the ``save_pretrained`` folder itself.
"""

from __future__ import annotations

from pathlib import Path

import torch

from altpo.errors import UserError

ADAPTER_DIR = "adapter"
PEFT_PREFIX = "base_model.model."


def lora_config(config):
    from peft import LoraConfig

    targets = [t.strip() for t in str(config.lora_targets).split(",") if t.strip()]
    rank = int(config.lora_rank)
    return LoraConfig(r=rank, lora_alpha=float(config.lora_alpha) or 2.0 * rank,
                      target_modules=targets, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")


def add_lora(model, config):
    """Put LoRA adapters into ``model`` in place; returns the peft wrapper (for saving)."""
    try:
        from peft import get_peft_model
    except ImportError:
        raise UserError("--lora-rank needs the peft package: pip install peft") from None
    cfg = lora_config(config)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(t for t in cfg.target_modules if t not in present)
    if missing:
        raise UserError(f"--lora-targets: the model has no modules named {', '.join(missing)}; "
                        f"linear layers it has: {', '.join(sorted(_linear_names(model)))}")
    return get_peft_model(model, cfg, autocast_adapter_dtype=False)


def _linear_names(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors of a full state dict of the adapted model (peft's key names)."""
    return {PEFT_PREFIX + k: v for k, v in state.items() if ".lora_" in k}


def save_lora_outputs(out, peft_model, state: dict[str, torch.Tensor], tokenizer, config) -> None:
    """``OUTPUT/adapter`` from ``state`` (the full CPU state dict of the adapted model) and, with
    ``--merge``, the merged model as OUTPUT's ``save_pretrained`` folder. Rank 0 only."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from altpo.model.saving import make_adapter_portable
    from altpo.train.checkpoint import save_final_model

    out = Path(out)
    model = peft_model.base_model.model
    peft_model.save_pretrained(str(out / ADAPTER_DIR), state_dict=adapter_state(state))
    make_adapter_portable(out / ADAPTER_DIR)  # peft 0.13 (transformers 4.45's time) loads it too
    if not config.merge:
        return
    dtype = next(iter(state.values())).dtype
    base = AutoModelForCausalLM.from_config(model.config, dtype=dtype, trust_remote_code=False)
    adapted = get_peft_model(base, lora_config(config), autocast_adapter_dtype=False)
    missing, unexpected = adapted.base_model.model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise RuntimeError(f"merging LoRA: state dict does not match ({missing[:3]}, {unexpected[:3]})")
    merged = adapted.merge_and_unload()
    save_final_model(out, merged, tokenizer)

