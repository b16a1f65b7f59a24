"""The memory planner's parameter-proportional bytes per GPU for every way a run can be spread:
one GPU or DDP (a whole model per GPU), FSDP over N GPUs, LoRA adapters, optimizer states in host
memory; plus the fixed costs outside PyTorch's allocations (the CUDA context, communication
buffers) and the host memory a run needs.

FSDP (torch FSDP2, ``fully_shard`` per decoder layer and at the root) splits every tensor along
its first dimension into N chunks of ceil(rows / N) rows (``torch.chunk``); rank 0 holds the
largest share, so the plan counts rank 0's bytes exactly from the tensor shapes:

    weights            shard(all parameters) * b
    gathered weights   the root group unsharded for the whole step (FSDP keeps the root's
                       parameters gathered between forward and backward): embedding, final norm,
                       lm_head; plus two decoder layers gathered at once (the current one and the
                       prefetched next), minus this rank's shards of them
    gradients          shard(trainable) * b, plus the unsharded gradients waiting for their
                       reduce-scatter: the root group's trainable ones and one decoder layer's
    master weights     fp32: shard(trainable) * 4; kahan: shard(trainable) * b
    optimizer states   shard(trainable) * 8

LoRA (rank r on a set of a decoder layer's linear layers): the base weights are frozen (no
gradient, no state), the adapters A (r x in) and B (out x r) are the trainable parameters, in the
weight dtype, with exact-update master weights like any trainable parameter. Per token and
layer they add the r-wide output of A, kept for B's backward: b * r per targeted module.

Optimizer offload (``--optimizer-offload cpu``): master weights (always fp32 for bf16 weights)
and moments live in host memory (12 bytes per trainable parameter on this rank); the device
keeps a chunk of the update at a time: 4 bytes per element (the fp32 gradient chunk on its way
to the host, update on the host) or 16 (gradient, both moments and master streamed in, update on
the device).

Outside the allocator: the CUDA context with cuBLAS workspaces (about 0.3 to 0.6 GiB; 0.6 GiB is
counted), and with several GPUs the NCCL communication buffers (256 MiB counted).

Host memory per process: the model as loaded before it moves to the GPU (every process loads the
whole model), the offloaded optimizer states, and the offloaded activation checkpoints.
"""

from __future__ import annotations

import math

from altpo.plan.model_shapes import ModelShape, PlanError

GIB = 1024**3
CUDA_CONTEXT_BYTES = 600 * 1024**2
COMMUNICATION_BYTES = 256 * 1024**2
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARALLEL_MODES = ("ddp", "fsdp")
OFFLOAD_MODES = ("none", "cpu")
OFFLOAD_UPDATES = ("cpu", "stream")


def shard_numel(shape: tuple[int, ...], world: int, rank: int = 0) -> int:
    """Elements of ``rank``'s FSDP2 shard of a tensor of ``shape`` (dim-0 chunks of ceil(d0/N))."""
    rows = shape[0]
    chunk = math.ceil(rows / world)
    mine = max(0, min(rows, (rank + 1) * chunk) - rank * chunk)
    return mine * math.prod(shape[1:])


def lora_shapes(shape: ModelShape, rank: int, targets) -> list[tuple[str, tuple[int, int]]]:
    """The LoRA A and B tensors of every decoder layer (peft's names, adapter name dropped)."""
    lin = shape.linear_shapes()
    shape.lora_parameters(rank, targets)  # checks the target names
    out = []
    for layer in range(shape.num_layers):
        for t in targets:
            fan_in, fan_out = lin[t]
            group = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            out.append((f"model.layers.{layer}.{group}.{t}.lora_A.weight", (rank, fan_in)))
            out.append((f"model.layers.{layer}.{group}.{t}.lora_B.weight", (fan_out, rank)))
    return out


def _is_layer(name: str, layer: int | None = None) -> bool:
    if layer is None:
        return name.startswith("model.layers.")
    return name.startswith(f"model.layers.{layer}.")


def parameter_memory(shape: ModelShape, *, b: int, gpus: int, parallel: str, lora_rank: int,
                     lora_targets, master_weights: str, optimizer_offload: str,
                     offload_update: str, optimizer_in_backward: bool, chunk_numel: int) -> dict:
    """Bytes on one GPU (rank 0) of weights, gathered weights, gradients, master weights, optimizer
    states, the optimizer step's workspace, and the host bytes of offloaded states."""
    world = gpus if parallel == "fsdp" else 1
    base = shape.parameter_shapes()
    adapters = lora_shapes(shape, lora_rank, lora_targets) if lora_rank else []
    every = base + adapters
    trainable = adapters if lora_rank else base

    def shard(items):
        return sum(shard_numel(s, world) for _, s in items)

    def full(items):
        return sum(math.prod(s) for _, s in items)

    weights = shard(every) * b
    gathered = 0
    if world > 1:
        root = [x for x in every if not _is_layer(x[0])]
        layer0 = [x for x in every if _is_layer(x[0], 0)]
        gathered = (full(root) - shard(root) + 2 * (full(layer0) - shard(layer0))) * b
    train_numel = shard(trainable)
    low = b < 4
    if optimizer_offload == "cpu":
        master, states = 0, 0
        host = train_numel * ((4 if low and master_weights != "none" else 0) + 8)
        largest = max((math.prod(s) if world == 1 else shard_numel(s, world)) for _, s in trainable)
        workspace = (4 if offload_update == "cpu" else 16) * min(largest, chunk_numel)
    else:
        master = {"fp32": 4, "kahan": b}.get(master_weights, 0) * train_numel if low else 0
        states = 8 * train_numel
        host = 0
        largest = max(math.prod(s) for _, s in trainable)
        workspace = 8 * min(largest, chunk_numel)
    if optimizer_in_backward and not lora_rank and world == 1:
        v_h = shape.vocab_size * shape.hidden_size
        gradients = shape.layer_parameters() * b + (v_h * b if shape.tie_word_embeddings else 0)
    elif world > 1:
        root_t = [x for x in trainable if not _is_layer(x[0])]
        layer_t = [x for x in trainable if _is_layer(x[0], 0)]
        gradients = (train_numel + full(root_t) + full(layer_t)) * b
    else:
        gradients = train_numel * b
    return {"weights": weights, "gathered_weights": gathered, "gradients": gradients,
            "master_weights": master, "optimizer_states": states,
            "optimizer_step_workspace": workspace, "host_optimizer_states": host,
            "trainable_parameters": full(trainable), "trainable_parameters_on_this_gpu": train_numel}


def lora_activation_bytes_per_token(shape: ModelShape, b: int, lora_rank: int, targets) -> int:
    """Per token and decoder layer: the output of every A (r wide), kept for B's backward."""
    return b * lora_rank * len(tuple(targets)) if lora_rank else 0


def check_scale_options(gpus, parallel, lora_rank, lora_targets, optimizer_offload,
                        offload_update) -> None:
    if not isinstance(gpus, int) or gpus < 1:
        raise PlanError(f"gpus must be a positive int, got {gpus!r}")
    if parallel not in PARALLEL_MODES:
        raise PlanError(f"parallel must be one of {', '.join(PARALLEL_MODES)}; got {parallel!r}")
    if not isinstance(lora_rank, int) or lora_rank < 0:
        raise PlanError(f"lora_rank must be a non-negative int, got {lora_rank!r}")
    if lora_rank and not tuple(lora_targets):
        raise PlanError("LoRA needs at least one target module")
    if optimizer_offload not in OFFLOAD_MODES:
        raise PlanError(f"optimizer_offload must be one of {', '.join(OFFLOAD_MODES)}; got {optimizer_offload!r}")
    if offload_update not in OFFLOAD_UPDATES:
        raise PlanError(f"offload_update must be one of {', '.join(OFFLOAD_UPDATES)}; got {offload_update!r}")


def smallest_gpu_count(fits, limit: int = 4096) -> int | None:
    """The smallest N in 1..limit with ``fits(N)``, for a ``fits`` that only gets truer with N
    (FSDP: every shard shrinks); None when even ``limit`` GPUs do not fit."""
    if fits(1):
        return 1
    hi = 2
    while hi <= limit and not fits(hi):
        hi *= 2
    if hi > limit:
        return limit if fits(limit) else None
    lo = hi // 2  # fits(lo) is False, fits(hi) is True
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi
