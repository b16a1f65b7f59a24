"""Memory settings of a run: tokens per micro-batch, activation checkpointing, master weights and
the optimizer step in backward, from the flags, the planner (on a GPU) or defaults; and the advice
given when the device runs out of memory."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from altpo.data.packing import UnitTooLongError, forget_units, retain_units
from altpo.data.tofu import AltPOData
from altpo.errors import UserError
from altpo.train.config import (
    DEFAULT_CPU_TOKENS_PER_MICROBATCH,
    DEFAULT_GPU_TOKENS_PER_MICROBATCH,
    TrainConfig,
)
from altpo.train.report import gib


def train_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[setting]


@dataclass
class MemorySettings:
    tokens_per_microbatch: int
    checkpointing: str          # none | layers | offload
    master_weights: str         # fp32 | kahan | none
    optimizer_in_backward: bool = False
    plan: object = None         # altpo.plan.memory_plan.MemoryPlan when the planner was used
    source: str = "settings"

    def forward_context(self, device):
        if self.checkpointing != "offload":
            return None
        from altpo.model.activation_checkpointing import offload_saved_tensors

        return lambda: offload_saved_tensors(True, device)

_CHECKPOINTING = {"on": "layers", "off": "none", "offload": "offload"}


def memory_settings(config: TrainConfig, model, dtype, device, data, sampler,
                     saved_master_mode: str | None, world: int = 1, parallel: str = "ddp",
                     lora: bool = False, offload: bool = False) -> MemorySettings:
    """Token budget, checkpointing and master weights: the flags, else the planner, else defaults.

    The planner (``altpo.plan.memory_plan``) runs on a CUDA device when any of the three is ``auto``,
    against the memory free before the model is moved there. On a CPU, ``auto`` means a fixed
    budget, no checkpointing and fp32 master weights. A resumed run keeps the master-weights mode
    its optimizer state was saved in.
    """
    need = largest_unit_tokens(data, config.batch_size)
    fixed_tokens = config.micro_batch_tokens()
    master = config.master_weights
    if master == "auto" and saved_master_mode is not None:
        master = saved_master_mode
    checkpointing = _CHECKPOINTING.get(config.gradient_checkpointing, "auto")
    in_backward = {"on": True, "off": False}.get(config.optimizer_in_backward, "auto")
    if in_backward == "auto" and (world > 1 or parallel == "fsdp" or offload or lora):
        in_backward = False  # the update in backward is single-process (see optimizer_in_backward)
    wants_plan = "auto" in (checkpointing, master, in_backward) or fixed_tokens is None
    plan = None
    if wants_plan and device.type == "cuda":
        plan = _plan_memory(config, model, dtype, device, data, sampler, need, fixed_tokens,
                            checkpointing, master, in_backward,
                            gpus=world if parallel == "fsdp" else 1, parallel=parallel)
    if plan is not None:
        tokens = fixed_tokens or plan.tokens_per_microbatch
        checkpointing = plan.checkpointing_mode if checkpointing == "auto" else checkpointing
        master = plan.master_weights if master == "auto" else master
        in_backward = plan.optimizer_in_backward if in_backward == "auto" else in_backward
        source = "altpo.plan.memory_plan"
    else:
        tokens = fixed_tokens or (DEFAULT_GPU_TOKENS_PER_MICROBATCH if device.type == "cuda"
                                  else DEFAULT_CPU_TOKENS_PER_MICROBATCH)
        tokens = max(tokens, need) if fixed_tokens is None else tokens
        checkpointing = "none" if checkpointing == "auto" else checkpointing
        master = "fp32" if master == "auto" else master
        in_backward = False if in_backward == "auto" else in_backward
        source = "defaults"
    if need > tokens:
        raise UserError(
            f"--tokens-per-microbatch {tokens} is too small: a forget answer and its alternates must "
            f"share a micro-batch and the largest such group has {need} tokens; raise "
            f"--tokens-per-microbatch to at least {need}, or lower --max-length")
    return MemorySettings(tokens, checkpointing, master, bool(in_backward), plan, source)


def _plan_memory(config, model, dtype, device, data, sampler, need, fixed_tokens, checkpointing,
                 master, in_backward, gpus=1, parallel="ddp"):
    try:
        from altpo.plan import memory_plan
    except ImportError:  # the planner is optional: defaults apply without it
        return None
    free = int(torch.cuda.mem_get_info(device)[0])
    # tokens of one step: the largest of the first epoch's steps (the update in backward keeps
    # every micro-batch's activations of a step, so a step above the plan's would not fit)
    tokens_per_step = 0
    for step in range(min(sampler.steps_per_epoch, 256)):
        rows = sampler.rows(step)
        units = forget_units(data, rows.step_pairs)
        if config.alpha > 0:
            units += retain_units(data, rows.step_retain)
        tokens_per_step = max(tokens_per_step, sum(u.num_tokens for u in units))
    try:
        plan = memory_plan.plan_memory(
            model.config, free, tokens_per_microbatch=fixed_tokens or "auto",
            checkpointing=checkpointing, master_weights=master, reference=config.reference,
            optimizer_in_backward=in_backward, tokens_per_step=max(tokens_per_step, need),
            max_seq_len=need, weight_dtype="bf16" if dtype == torch.bfloat16 else "fp32",
            gpus=gpus, parallel=parallel, lora_rank=int(config.lora_rank),
            optimizer_offload=config.optimizer_offload,
            cuda_context_bytes=0)  # the free memory was measured with the context already made
    except ValueError as err:
        raise UserError(f"memory plan: {err}") from None
    if not plan.fits:
        smallest = (f"; the smallest budget that fits is {gib(plan.smallest_budget_bytes)} with "
                    + ", ".join(f"{k}={v}" for k, v in (plan.smallest_budget_settings or {}).items())
                    if plan.smallest_budget_bytes else "")
        notes = "".join(f"; {n}" for n in plan.notes)
        raise UserError(
            f"the memory plan does not fit: it needs {gib(plan.total_bytes)} and {device} has "
            f"{gib(free)} free{smallest}{notes}. Run `altpo-fast plan --model {config.model}` "
            "for the table, or set --tokens-per-microbatch, --gradient-checkpointing, "
            "--master-weights and --optimizer-in-backward yourself")
    return plan


def largest_unit_tokens(data: AltPOData, batch_size: int) -> int:
    """Tokens of the largest group that must share a micro-batch (a forget answer and its
    alternates in one step), or of the longest retain row."""
    alts: dict[int, list[int]] = {}
    for p, q in enumerate(data.pair_question):
        alts.setdefault(q, []).append(len(data.alternates[p].input_ids))
    worst = max(len(data.forget[q].input_ids) + sum(sorted(lens, reverse=True)[:batch_size])
                for q, lens in alts.items())
    return max(worst, max((len(r.input_ids) for r in data.retain), default=0))


@contextmanager
def explain_oom(config: TrainConfig, memory: MemorySettings):
    try:
        yield
    except torch.OutOfMemoryError:
        hints = [f"lower --tokens-per-microbatch (now {memory.tokens_per_microbatch})"]
        if memory.checkpointing == "none":
            hints.append("add --gradient-checkpointing on")
        if memory.master_weights == "fp32":
            hints.append("use --master-weights kahan (2 bytes/param instead of 4)")
        if not memory.optimizer_in_backward:
            hints.append("add --optimizer-in-backward on (no whole-model gradients)")
        if config.reference == "resident":
            hints.append("use --reference cached (no second model)")
        hints.append("run `altpo-fast plan` to see what fits")
        raise UserError("the device ran out of memory; " + "; ".join(hints)) from None
    except UnitTooLongError as err:
        raise UserError(f"{err}; raise --tokens-per-microbatch to at least {err.tokens}") from None
