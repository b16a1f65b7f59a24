"""Plan GPU memory for AltPO training: bytes per component per GPU, chosen settings, fits or not.

Covers one GPU, several with DDP or FSDP, LoRA and optimizer states in host memory; counts the
CUDA context; names the smallest number of GPUs that fits with FSDP and the host memory needed.
The flags are named as `altpo-fast train` names them.

Examples:
  altpo-fast plan --model llama-3.2-1b --gpu-memory 16GiB
  altpo-fast plan --model llama-3.1-8b --gpu-memory 40GB --lora-rank 16
  altpo-fast plan --model llama-3.1-8b --gpu-memory 80GB --optimizer-offload cpu
  altpo-fast plan --model llama-3.1-8b --gpu-memory 80GB --gpus 8 --parallel fsdp
  altpo-fast plan --model path/to/model_folder --gpu-memory 80GB --json

Exit status: 0 when the plan fits, 1 when it does not, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from altpo.cli.flags import add_flags, dtype_setting, setting, settings_from_args

from altpo.errors import UserError
from altpo.plan.memory_plan_parallel import DEFAULT_LORA_TARGETS
from altpo.plan.memory_plan import (
    DEFAULT_MAX_SEQ_LEN,
    DEFAULT_TOKENS_PER_STEP,
    MASTER_MODES,
    NAMED_SHAPES,
    REFERENCE_MODES,
    PlanError,
    detect_gpu_memory,
    format_bytes,
    load_model_shape,
    parse_bytes,
    plan_memory,
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _tokens(text: str):
    return "auto" if text == "auto" else _positive_int(text)


def _s(default, help: str, **kw):
    return setting(default, help, show_default=False, **kw)  # the help says the default


@dataclass
class PlanSettings:
    """The settings of ``altpo-fast plan``, one flag each, named and valued as train's."""

    model: str = _s(None, f"a named shape ({', '.join(NAMED_SHAPES)}), a local model folder with "
                    "config.json, or a Hugging Face hub id (needs the hub)", required=True)
    gpu_memory: str | None = _s(None, "memory budget, e.g. 16GiB or 80GB (default: the free memory "
                                "of the visible GPU; required without one)", metavar="SIZE")
    tokens_per_microbatch: str = _s("auto", "tokens in one packed micro-batch; auto: the largest "
                                    "that fits (default auto)", type=_tokens, metavar="N|auto")
    gradient_checkpointing: str = _s(
        "auto", "activation checkpointing, as train names it: off, on (recompute each decoder "
        "layer), offload (on, with the checkpoints in pinned CPU memory); auto: the cheapest that "
        "fits (default)", choices=("auto", "on", "off", "offload"), old=("--checkpointing",),
        old_values={"none": "off", "layers": "on"})
    master_weights: str = _s("auto", "exact updates for bf16 weights: fp32 master copy, kahan "
                             "compensation buffer, or none; auto: fp32 when it fits, else kahan "
                             "(default auto)", choices=MASTER_MODES + ("auto",))
    reference: str = _s("cached", "reference model: cached log-probs (freed during training, "
                        "default) or resident on the GPU", choices=REFERENCE_MODES)
    optimizer_in_backward: str = _s("auto", "step each parameter as soon as its gradient is "
                                    "complete and free the gradient; auto: only when the plan does "
                                    "not fit otherwise (default auto)", choices=("auto", "on", "off"),
                                    old_values={"yes": "on", "no": "off"})
    gpus: int = _s(1, "GPUs, each with --gpu-memory (default 1)", type=_positive_int, metavar="N")
    parallel: str = _s("auto", "ddp: a whole model per GPU; fsdp: parameters, gradients and "
                       "optimizer states sharded over the GPUs (default auto: fsdp with several "
                       "GPUs, else ddp)", choices=("auto", "ddp", "fsdp"))
    lora_rank: int = _s(0, "plan LoRA adapters of rank R instead of full-parameter training",
                        metavar="R")
    lora_targets: str = _s(",".join(DEFAULT_LORA_TARGETS), "modules with LoRA adapters (default: "
                           "every linear layer of a block)", metavar="NAMES")
    optimizer_offload: str = _s("none", "cpu: master weights and AdamW moments in host memory",
                                choices=("none", "cpu"))
    offload_update: str = _s("cpu", "with --optimizer-offload cpu: update on the host, or streamed "
                             "to the GPU", choices=("cpu", "stream"))
    cuda_context: str = _s("600MiB", "memory the CUDA context and library workspaces take outside "
                           "PyTorch (default 600MiB; 0B when --gpu-memory is already what PyTorch "
                           "may allocate)", metavar="SIZE")
    tokens_per_step: int = _s(DEFAULT_TOKENS_PER_STEP, "tokens in one optimizer step, all "
                              f"micro-batches (default {DEFAULT_TOKENS_PER_STEP} = 96 x 128: the "
                              "TOFU recipe's 96 sequences, which average 91-97 tokens with the "
                              "Llama-3 template)", type=_positive_int, metavar="N")
    max_length: int = _s(DEFAULT_MAX_SEQ_LEN, "longest sequence, prompt plus answer, as train's "
                         "--max-length; a micro-batch holds at least one (default "
                         f"{DEFAULT_MAX_SEQ_LEN})", type=_positive_int, metavar="N",
                         old=("--max-seq-len",))
    dtype: str = dtype_setting("dtype of the weights and activations (default auto: bf16, a GPU's)")
    json: bool = _s(False, "print the plan as JSON instead of a table")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, PlanSettings)


def _flag_bytes(flag: str, text: str) -> int:
    try:
        return parse_bytes(text)
    except PlanError as err:
        raise UserError(f"{flag} {text}: {err}") from None


def run(args) -> int:
    args = settings_from_args(PlanSettings, args)
    try:
        if args.gpu_memory is not None:
            budget = _flag_bytes("--gpu-memory", args.gpu_memory)
            source = "given"
        else:
            found = detect_gpu_memory()
            if found is None:
                raise UserError("no GPU is visible: give the budget with --gpu-memory, e.g. --gpu-memory 16GiB")
            budget, source = found
        shape = load_model_shape(args.model)
        in_bwd = {"auto": "auto", "on": True, "off": False}[args.optimizer_in_backward]
        ckpt = {"on": "layers", "off": "none"}.get(args.gradient_checkpointing, args.gradient_checkpointing)
        parallel = args.parallel if args.parallel != "auto" else ("fsdp" if args.gpus > 1 else "ddp")
        context = 0 if args.cuda_context.strip() in ("0", "0B") else _flag_bytes("--cuda-context", args.cuda_context)
        if source != "given":
            context = 0  # the free memory of the visible GPU already excludes its context
        plan = plan_memory(
            shape, budget,
            tokens_per_microbatch=args.tokens_per_microbatch,
            checkpointing=ckpt,
            master_weights=args.master_weights,
            reference=args.reference,
            optimizer_in_backward=in_bwd,
            tokens_per_step=args.tokens_per_step,
            max_seq_len=args.max_length,
            weight_dtype="bf16" if args.dtype == "auto" else args.dtype,
            gpus=args.gpus,
            parallel=parallel,
            lora_rank=args.lora_rank,
            lora_targets=[t.strip() for t in args.lora_targets.split(",") if t.strip()],
            optimizer_offload=args.optimizer_offload,
            offload_update=args.offload_update,
            cuda_context_bytes=context,
        )
    except PlanError as err:
        raise UserError(str(err)) from None
    if args.json:
        out = plan.to_json_dict()
        out["gpu_memory_source"] = source
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        if source != "given":
            print(f"budget: {format_bytes(budget)}, the {source}")
        print(plan.format_table())
    return 0 if plan.fits else 1
