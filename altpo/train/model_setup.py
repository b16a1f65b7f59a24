"""The model's training switches: packed attention and activation checkpointing, and the line that
says how the model will train."""

from __future__ import annotations

from altpo.errors import UserError
from altpo.model.activation_checkpointing import enable_activation_checkpointing
from altpo.model.packed_attention import enable_packed_attention
from altpo.train.numerics import attention_for_masked_keys
from altpo.train.report import gib


def prepare_model(model, config, memory, dtype, dist, say, masked_key_id: int | None = None) -> None:
    """Packed attention (``--attention``) and the memory settings' activation checkpointing.

    ``masked_key_id`` (the data's, set by ``--numerics open-unlearning`` with pad = eos) needs the
    one backend that hides single keys: sdpa (chosen by auto, refused when another is named)."""
    attention = config.attention
    if masked_key_id is not None:
        attention = attention_for_masked_keys(attention)
    try:
        attention = enable_packed_attention(model, attention)
    except ValueError as err:
        raise UserError(f"--attention {config.attention}: {err}") from None
    if memory.checkpointing != "none":
        enable_activation_checkpointing(model, memory.checkpointing)
    say(f"model {config.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{str(dtype).replace('torch.', '')} on {dist.device}, attention {attention}, "
        f"{memory.tokens_per_microbatch} tokens per micro-batch, checkpointing {memory.checkpointing}, "
        f"master weights {memory.master_weights}, optimizer in backward "
        f"{'on' if memory.optimizer_in_backward else 'off'}, {dist.world} process(es)")
    if memory.plan is not None:
        say(f"memory plan: predicted peak {gib(memory.plan.predicted_allocated_bytes)} of "
            f"{gib(memory.plan.gpu_memory_bytes)} free ({memory.source})")
