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

from altpo.errors import UserError
from altpo.plan.memory_plan_parallel import DEFAULT_LORA_TARGETS
from altpo.plan.memory_plan import (
    CHECKPOINTING_MODES,
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
from altpo.cli.flags import add_old_spelling


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True,
        help=f"a named shape ({', '.join(NAMED_SHAPES)}), a local model folder with config.json, "
        "or a Hugging Face hub id (needs the hub)",
    )
    parser.add_argument(
        "--gpu-memory", metavar="SIZE",
        help="memory budget, e.g. 16GiB or 80GB (default: the free memory of the visible GPU; "
        "required without one)",
    )
    parser.add_argument(
        "--tokens-per-microbatch", type=_tokens, default="auto", metavar="N|auto",
        help="tokens in one packed micro-batch; auto: the largest that fits (default auto)",
    )
    parser.add_argument(
        "--gradient-checkpointing", "--checkpointing", dest="checkpointing",
        choices=("auto", "on", "off", "offload") + CHECKPOINTING_MODES[:2], default="auto",
        help="activation checkpointing, as train names it: off, on (recompute each decoder layer), "
        "offload (on, with the checkpoints in pinned CPU memory); auto: the cheapest that fits "
        "(default). none and layers are accepted for off and on",
    )
    parser.add_argument(
        "--master-weights", choices=MASTER_MODES + ("auto",), default="auto",
        help="exact updates for bf16 weights: fp32 master copy, kahan compensation buffer, or none; "
        "auto: fp32 when it fits, else kahan (default auto)",
    )
    parser.add_argument(
        "--reference", choices=REFERENCE_MODES, default="cached",
        help="reference model: cached log-probs (freed during training, default) or resident on the GPU",
    )
    parser.add_argument(
        "--optimizer-in-backward", choices=("auto", "on", "off", "yes", "no"), default="auto",
        help="step each parameter as soon as its gradient is complete and free the gradient; "
        "auto: only when the plan does not fit otherwise (default auto); yes and no are accepted "
        "for on and off",
    )
    parser.add_argument("--gpus", type=_positive_int, default=1, metavar="N",
                        help="GPUs, each with --gpu-memory (default 1)")
    parser.add_argument("--parallel", choices=("ddp", "fsdp"), default=None,
                        help="ddp: a whole model per GPU; fsdp: parameters, gradients and optimizer "
                        "states sharded over the GPUs (default: fsdp with several GPUs, else ddp)")
    parser.add_argument("--lora-rank", type=int, default=0, metavar="R",
                        help="plan LoRA adapters of rank R instead of full-parameter training")
    parser.add_argument("--lora-targets", default=",".join(DEFAULT_LORA_TARGETS), metavar="NAMES",
                        help="modules with LoRA adapters (default: every linear layer of a block)")
    parser.add_argument("--optimizer-offload", choices=("none", "cpu"), default="none",
                        help="cpu: master weights and AdamW moments in host memory")
    parser.add_argument("--offload-update", choices=("cpu", "stream"), default="cpu",
                        help="with --optimizer-offload cpu: update on the host, or streamed to the GPU")
    parser.add_argument("--cuda-context", default="600MiB", metavar="SIZE",
                        help="memory the CUDA context and library workspaces take outside PyTorch "
                        "(default 600MiB; 0B when --gpu-memory is already what PyTorch may allocate)")
    parser.add_argument(
        "--tokens-per-step", type=_positive_int, default=DEFAULT_TOKENS_PER_STEP, metavar="N",
        help=f"tokens in one optimizer step, all micro-batches (default {DEFAULT_TOKENS_PER_STEP} = "
        "96 x 128: the TOFU recipe's 96 sequences, which average 91-97 tokens with the Llama-3 "
        "template)",
    )
    parser.add_argument(
        "--max-length", dest="max_seq_len", type=_positive_int, default=DEFAULT_MAX_SEQ_LEN,
        metavar="N", help=f"longest sequence, prompt plus answer, as train's --max-length; a "
        f"micro-batch holds at least one (default {DEFAULT_MAX_SEQ_LEN})",
    )
    add_old_spelling(parser, "--max-seq-len", "--max-length", "max_seq_len", type=_positive_int)
    parser.add_argument(
        "--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
        help="dtype of the weights and activations (default bf16)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")


def _flag_bytes(flag: str, text: str) -> int:
    try:
        return parse_bytes(text)
    except PlanError as err:
        raise UserError(f"{flag} {text}: {err}") from None


def run(args) -> int:
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
        in_bwd = {"auto": "auto", "yes": True, "no": False, "on": True, "off": False}[args.optimizer_in_backward]
        ckpt = {"on": "layers", "off": "none"}.get(args.checkpointing, args.checkpointing)
        parallel = args.parallel or ("fsdp" if args.gpus > 1 else "ddp")
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
            max_seq_len=args.max_seq_len,
            weight_dtype=args.dtype,
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
