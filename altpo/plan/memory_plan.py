"""The memory planner: every byte of an AltPO training step on one GPU, before any GPU time is spent.

``plan_memory(model_config, gpu_memory_bytes, ...)`` returns a :class:`MemoryPlan`: the bytes of
each component at the step's peak, the settings it chose (tokens per micro-batch, activation
checkpointing, master-weights mode, reference mode, optimizer step in backward), whether that fits
the budget and, when nothing fits, the smallest budget that would.

Notation: P parameters (tied embeddings counted once), H hidden size, L layers, I MLP size,
V vocabulary, nh / nkv query / key-value heads of size hd, Aq = nh*hd, Akv = nkv*hd, b bytes of
the weight/activation dtype (2 for bf16), T tokens per micro-batch, S tokens per optimizer step.

Parameter-proportional parts (exact, from the config):

    weights            P * b
    master weights     fp32: P * 4 (0 when the weights are fp32); kahan: P * b; none: 0
    optimizer states   P * 8                      AdamW exp_avg and exp_avg_sq in fp32
    gradients          accumulated: P * b         (gradients in the weight dtype)
                       in backward: one decoder layer's parameters * b, plus V*H*b when the
                       embedding is tied (its gradient is started by the loss backward and only
                       completed by the embedding backward, at the very end)
    reference          resident: P * b; cached: 0 (log-probs are computed once and kept on the CPU)

Activations (per token; a per-layer estimate of the tensors autograd saves for a Llama block with
a varlen/flash attention kernel, which saves no [T, T] matrix):

    A_layer = 2*(4H + bH + 4)             two RMSNorms: fp32 copy of the input, normalised output, 1/rms
            + 2*bH                        inputs of the q/k/v and the gate/up projections
            + b*(Aq + 2*Akv) + b*Aq + 4*nh   attention: q, k, v after RoPE, output, log-sum-exp
            + 4*b*I                       SwiGLU: gate, silu(gate), up, their product
    A_final = 4H + 2bH + 2b*hd + 36       final RMSNorm (4H + bH + 4), the hidden state the loss
                                          keeps (bH), RoPE cos and sin shared by all layers (2b*hd),
                                          input ids (8), labels, sequence ids, log-sum-exp, log-prob (24)
    B_tmp   = max(b*(3I + 2H), 4*Aq + 3b*Aq + 2b*Akv + 2bH)   gradient temporaries of one block

    no checkpointing      retained = L*A_layer + A_final            transient = B_tmp
    layers                retained = L*b*H + A_final (block inputs)  transient = A_layer + B_tmp
                          (one block is recomputed at a time in backward)
    offload               as "layers", but the block inputs are saved to pinned CPU memory
                          (torch.autograd.graph.save_on_cpu); on the GPU: 2*b*H + A_final per token

Retained activations cover T tokens when gradients are accumulated over micro-batches, and all S
tokens of the step when the optimizer steps inside backward (every micro-batch's forward runs
first, then backward goes stage by stage: see ``altpo.train.optimizer_in_backward``).

Loss workspace (altpo_kernels' fused loss backward): an fp32 dW accumulator for one band of
``LOSS_DW_BAND_ROWS`` vocabulary rows (Bv*H*4; the kernels sum dW band by band), the dW result
in the weight dtype V*H*b (counted under gradients when that is the tied embedding's gradient), and per token an fp32 dH (4H), the answer-row copy of the hidden states (bH), the dH
cast and scatter (2bH), plus 16 bytes of forward outputs. The logits [T, V] are never held.

Other transients: the embedding backward's dense [V, H] gradient (V*H*b), an optimizer step on
at most ``OPTIMIZER_CHUNK_NUMEL`` elements at a time (8 bytes each: fp32 gradient and update),
the resident reference's forward (b*(3I + 3H) + 4H per token). These never coexist, so the peak
counts the largest of them, and ``not_at_peak`` lists the rest.

Allocator slack: 5% of everything that is not parameter-proportional, plus 256 MiB, for the
caching allocator's fragmentation (``max_memory_reserved`` above ``max_memory_allocated``).

The budget is memory PyTorch may allocate: the CUDA context (about 0.3-0.6 GiB) lies outside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from altpo.plan.memory_plan_parallel import (
    CUDA_CONTEXT_BYTES,
    COMMUNICATION_BYTES,
    DEFAULT_LORA_TARGETS,
    check_scale_options,
    lora_activation_bytes_per_token,
    parameter_memory,
    smallest_gpu_count,
)
from altpo.plan.model_shapes import (  # noqa: F401  (re-exported: the planner's public names)
    NAMED_SHAPES,
    SUPPORTED_MODEL_TYPES,
    ModelShape,
    PlanError,
    _as_shape,
    format_bytes,
    load_model_shape,
    parse_bytes,
    shape_from_config,
)

GIB = 1024**3
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
MASTER_MODES = ("fp32", "kahan", "none")
CHECKPOINTING_MODES = ("none", "layers", "offload")
REFERENCE_MODES = ("cached", "resident")

# Optimizer steps on tensors larger than this run chunk by chunk (AdamW is elementwise, so this
# is exact), keeping the fp32 temporaries at 128 MiB instead of 2 GiB for a 128k-vocab embedding.
# Rows of the fp32 dW band of the Triton loss backward (altpo_kernels.triton.logprobs_backward).
LOSS_DW_BAND_ROWS = 16384
OPTIMIZER_CHUNK_NUMEL = 1 << 24
SLACK_FRACTION = 0.05
SLACK_FIXED = 256 * 1024**2
TOKEN_GRANULE = 256
# A micro-batch of this many tokens keeps a GPU busy; below it the planner prefers checkpointing.
GOOD_TOKENS_PER_MICROBATCH = 4096
# The TOFU forget10 recipe: 32 forget rows with their alternate and original answers plus 32
# retain rows. With the Llama-3 chat template those sequences average 91-97 tokens (p90 110-117,
# benchmarks/tofu_lengths.json); 128 tokens each leaves room for longer alternates.
DEFAULT_TOKENS_PER_STEP = 96 * 128
DEFAULT_MAX_SEQ_LEN = 512


# ----------------------------------------------------------------------------------------------
# the estimate


@dataclass(frozen=True)
class _Settings:
    tokens_per_microbatch: int
    checkpointing: str
    master_weights: str
    reference: str
    optimizer_in_backward: bool
    tokens_per_step: int
    weight_dtype: str
    # several GPUs, LoRA, offloaded optimizer states, memory outside the allocator
    gpus: int = 1
    parallel: str = "ddp"
    lora_rank: int = 0
    lora_targets: tuple = DEFAULT_LORA_TARGETS
    optimizer_offload: str = "none"
    offload_update: str = "cpu"
    cuda_context: int = CUDA_CONTEXT_BYTES


def activation_bytes_per_token(shape: ModelShape, dtype: str = "bf16", attention: str = "varlen") -> dict:
    """Per-token activation terms of the module docstring: A_layer, A_final, B_tmp (bytes).

    ``attention="sdpa"`` is the CPU segment-SDPA path, which keeps one more copy of the attention
    output (b*Aq) per layer than the varlen kernels.
    """
    b = DTYPE_BYTES[dtype]
    h, i = shape.hidden_size, shape.intermediate_size
    aq, akv = shape.q_width, shape.kv_width
    a_layer = (2 * (4 * h + b * h + 4) + 2 * b * h + b * (aq + 2 * akv) + b * aq
               + 4 * shape.num_heads + 4 * b * i)
    if attention == "sdpa":
        a_layer += b * aq
    a_final = 4 * h + 2 * b * h + 2 * b * shape.hd + 36
    b_tmp = max(b * (3 * i + 2 * h), 4 * aq + 3 * b * aq + 2 * b * akv + 2 * b * h)
    return {"layer": a_layer, "final": a_final, "backward_temporaries": b_tmp}


def _estimate(shape: ModelShape, s: _Settings) -> tuple[dict, dict, dict]:
    """(components at the peak, transients not at the peak, details) for one setting."""
    b = DTYPE_BYTES[s.weight_dtype]
    p = shape.num_parameters()
    v_h = shape.vocab_size * shape.hidden_size
    h = shape.hidden_size
    t = s.tokens_per_microbatch
    act = activation_bytes_per_token(shape, s.weight_dtype)
    layers = shape.num_layers

    par = parameter_memory(shape, b=b, gpus=s.gpus, parallel=s.parallel, lora_rank=s.lora_rank,
                           lora_targets=s.lora_targets, master_weights=s.master_weights,
                           optimizer_offload=s.optimizer_offload, offload_update=s.offload_update,
                           optimizer_in_backward=s.optimizer_in_backward,
                           chunk_numel=OPTIMIZER_CHUNK_NUMEL)
    weights, master, optimizer, gradients = (par["weights"], par["master_weights"],
                                             par["optimizer_states"], par["gradients"])
    reference = p * b if s.reference == "resident" else 0

    lora_act = layers * lora_activation_bytes_per_token(shape, b, s.lora_rank, s.lora_targets)
    retained_full = layers * act["layer"] + act["final"] + lora_act
    retained_ckpt = layers * b * h + act["final"]
    retained_tokens = s.tokens_per_step if s.optimizer_in_backward else t
    if s.checkpointing == "none":
        activations = retained_full * retained_tokens
        backward_ws = act["backward_temporaries"] * t
    elif s.checkpointing == "layers":
        activations = retained_ckpt * retained_tokens
        backward_ws = (act["layer"] + act["backward_temporaries"]) * t
    else:  # offload
        activations = (2 * b * h + act["final"]) * t
        backward_ws = (act["layer"] + act["backward_temporaries"]) * t

    cast_is_gradient = s.optimizer_in_backward and shape.tie_word_embeddings
    loss_ws = 4 * min(shape.vocab_size, LOSS_DW_BAND_ROWS) * h + (0 if cast_is_gradient else b * v_h) + (4 * h + 3 * b * h + 16) * t
    transients = {
        "loss_workspace": loss_ws,
        "recompute_and_backward_workspace": backward_ws,
        "embedding_backward_workspace": v_h * b,
        "optimizer_step_workspace": par["optimizer_step_workspace"],
    }
    if s.reference == "resident":
        transients["reference_forward_workspace"] = (b * (3 * shape.intermediate_size + 3 * h) + 4 * h) * t
    peak_name = max(transients, key=transients.get)

    components = {
        "weights": weights,
        **({"gathered_weights": par["gathered_weights"]} if s.parallel == "fsdp" and s.gpus > 1 else {}),
        "master_weights": master,
        "optimizer_states": optimizer,
        "gradients": gradients,
        "reference": reference,
        "activations": activations,
        peak_name: transients[peak_name],
    }
    dynamic = gradients + activations + transients[peak_name]
    components["allocator_slack"] = int(SLACK_FRACTION * dynamic) + SLACK_FIXED
    if s.gpus > 1:
        components["communication_buffers"] = COMMUNICATION_BYTES
    if s.cuda_context:
        components["cuda_context"] = s.cuda_context
    not_at_peak = {k: v for k, v in transients.items() if k != peak_name}
    details = {
        "num_parameters": p,
        "activations_without_checkpointing": retained_full * retained_tokens,
        "activations_with_layer_checkpointing": retained_ckpt * retained_tokens,
        "activations_with_offloaded_checkpoints": (2 * b * h + act["final"]) * t,
        "host_memory_for_offloaded_checkpoints": retained_ckpt * retained_tokens if s.checkpointing == "offload" else 0,
        "reference_resident": p * b,
        "reference_cached": 0,
        "activation_bytes_per_token": act,
        "trainable_parameters": par["trainable_parameters"],
        "trainable_parameters_on_this_gpu": par["trainable_parameters_on_this_gpu"],
        "host_memory_for_optimizer_states": par["host_optimizer_states"],
        # every process loads the whole model on the CPU before moving or sharding it
        "host_memory_for_model_loading": p * b,
    }
    host = details["host_memory_for_optimizer_states"] + details["host_memory_for_offloaded_checkpoints"]
    details["host_memory_per_process"] = max(host, details["host_memory_for_model_loading"])
    return components, not_at_peak, details


@dataclass
class MemoryPlan:
    """The planner's answer. ``components`` sum to ``total_bytes``; see the module docstring."""

    model: str
    gpu_memory_bytes: int
    components: dict
    not_at_peak: dict
    details: dict
    settings: dict
    fits: bool
    notes: list = field(default_factory=list)
    smallest_budget_bytes: int | None = None
    smallest_budget_settings: dict | None = None

    # the chosen settings as attributes, for callers such as the trainer
    @property
    def tokens_per_microbatch(self) -> int:
        return int(self.settings["tokens_per_microbatch"])

    @property
    def checkpointing(self) -> bool:
        """True when decoder layers are recomputed in backward (modes "layers" and "offload")."""
        return self.settings["checkpointing"] != "none"

    @property
    def checkpointing_mode(self) -> str:
        return self.settings["checkpointing"]

    @property
    def offload_checkpoints(self) -> bool:
        return self.settings["checkpointing"] == "offload"

    @property
    def optimizer_in_backward(self) -> bool:
        return bool(self.settings["optimizer_in_backward"])

    @property
    def master_weights(self) -> str:
        return self.settings["master_weights"].split(" ")[0]

    @property
    def reference(self) -> str:
        return self.settings["reference"]

    @property
    def total_bytes(self) -> int:
        return sum(self.components.values())

    @property
    def predicted_allocated_bytes(self) -> int:
        """The peak ``torch.cuda.max_memory_allocated`` should show (the total without slack)."""
        return self.total_bytes - self.components.get("allocator_slack", 0)

    def to_json_dict(self) -> dict:
        return {
            "model": self.model,
            "gpu_memory_bytes": self.gpu_memory_bytes,
            "components": dict(self.components),
            "total_bytes": self.total_bytes,
            "predicted_max_memory_allocated_bytes": self.predicted_allocated_bytes,
            "fits": self.fits,
            "settings": dict(self.settings),
            "not_at_peak": dict(self.not_at_peak),
            "details": self.details,
            "smallest_budget_bytes": self.smallest_budget_bytes,
            "smallest_budget_settings": self.smallest_budget_settings,
            "notes": list(self.notes),
        }

    def format_table(self) -> str:
        """The plan as a plain-text table with the chosen settings and the verdict."""
        width = 40
        gpus = self.settings.get("gpus", 1)
        spread = (f" on each of {gpus} GPUs ({self.settings['parallel']})" if gpus > 1 else "")
        lines = [f"memory plan: {self.model} ({self.details['num_parameters']:,} parameters), "
                 f"budget {format_bytes(self.gpu_memory_bytes)}{spread}", ""]
        lines.append(f"{'component':<{width}} {'bytes':>15} {'size':>12}")
        lines.append("-" * (width + 29))
        for name, n in self.components.items():
            lines.append(f"{name:<{width}} {n:>15,} {format_bytes(n):>12}")
        lines.append("-" * (width + 29))
        total = self.total_bytes
        lines.append(f"{'total at peak':<{width}} {total:>15,} {format_bytes(total):>12}")
        lines.append(f"{'budget':<{width}} {self.gpu_memory_bytes:>15,} {format_bytes(self.gpu_memory_bytes):>12}")
        lines.append("")
        lines.append("not at the peak (freed before it, shown for reference):")
        for name, n in self.not_at_peak.items():
            lines.append(f"  {name:<{width - 2}} {n:>15,} {format_bytes(n):>12}")
        d = self.details
        for key in ("activations_without_checkpointing", "activations_with_layer_checkpointing",
                    "activations_with_offloaded_checkpoints", "reference_resident"):
            lines.append(f"  {key:<{width - 2}} {d[key]:>15,} {format_bytes(d[key]):>12}")
        if d["host_memory_for_offloaded_checkpoints"]:
            n = d["host_memory_for_offloaded_checkpoints"]
            lines.append(f"  {'pinned CPU memory for checkpoints':<{width - 2}} {n:>15,} {format_bytes(n):>12}")
        host = d.get("host_memory_per_process")
        if host is not None:
            lines.append(f"  {'host memory per process':<{width - 2}} {host:>15,} {format_bytes(host):>12}")
        lines.append("")
        lines.append("settings:")
        for k, val in self.settings.items():
            lines.append(f"  {k:<{width - 2}} {val}")
        lines.append("")
        if self.fits:
            lines.append(f"fits: yes ({format_bytes(self.gpu_memory_bytes - total)} to spare)")
        else:
            lines.append(f"fits: NO: needs {format_bytes(total)}, the budget is "
                         f"{format_bytes(self.gpu_memory_bytes)}")
            if self.smallest_budget_bytes is not None:
                lines.append(f"smallest budget that fits: {format_bytes(self.smallest_budget_bytes)} "
                             f"({self.smallest_budget_bytes:,} bytes) with "
                             + ", ".join(f"{k}={v}" for k, v in self.smallest_budget_settings.items()))
        if self.details.get("smallest_gpus") is not None:
            lines.append(f"smallest number of GPUs that fits (--parallel fsdp): {self.details['smallest_gpus']}")
        if self.fits:
            lines.append(f"train with: {train_flags(self.settings)}")
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)


def _settings_dict(s: _Settings, shape: ModelShape) -> dict:
    master = s.master_weights
    if DTYPE_BYTES[s.weight_dtype] == 4 and master != "none":
        master = f"{master} (not needed: the weights are fp32)"
    return {
        "tokens_per_microbatch": s.tokens_per_microbatch,
        "checkpointing": s.checkpointing,
        "master_weights": master,
        "reference": s.reference,
        "optimizer_in_backward": s.optimizer_in_backward,
        "tokens_per_step": s.tokens_per_step,
        "weight_dtype": s.weight_dtype,
        "optimizer": "AdamW, fp32 states",
        "gpus": s.gpus,
        "parallel": s.parallel,
        "lora_rank": s.lora_rank,
        "optimizer_offload": s.optimizer_offload if s.optimizer_offload == "none"
        else f"{s.optimizer_offload} (update: {s.offload_update})",
    }


_TRAIN_CHECKPOINTING = {"none": "off", "layers": "on", "offload": "offload"}


def train_flags(settings: dict) -> str:
    """The ``altpo-fast train`` flags that select a plan's settings."""
    flags = [f"--tokens-per-microbatch {settings['tokens_per_microbatch']}",
             f"--gradient-checkpointing {_TRAIN_CHECKPOINTING[settings['checkpointing']]}",
             f"--master-weights {str(settings['master_weights']).split(' ')[0]}",
             f"--optimizer-in-backward {'on' if settings['optimizer_in_backward'] else 'off'}",
             f"--reference {settings['reference']}"]
    if settings.get("gpus", 1) > 1:
        flags.append(f"--parallel {settings['parallel']}")
    if settings.get("lora_rank"):
        flags.append(f"--lora-rank {settings['lora_rank']}")
    offload = str(settings.get("optimizer_offload", "none"))
    if offload != "none":
        flags.append(f"--optimizer-offload cpu --offload-update {offload.split('update: ')[1].rstrip(')')}")
    return " ".join(flags)


def _total(shape, s) -> int:
    return sum(_estimate(shape, s)[0].values())


def _largest_tokens(shape, s: _Settings, budget: int, lo: int, hi: int) -> int | None:
    """Largest T in [lo, hi] (a multiple of TOKEN_GRANULE, or lo itself) that fits, else None."""
    if _total(shape, replace(s, tokens_per_microbatch=lo)) > budget:
        return None
    best = lo
    a, z = math.ceil(lo / TOKEN_GRANULE), hi // TOKEN_GRANULE
    while a <= z:  # the total grows with T, so bisect on multiples of the granule
        mid = (a + z) // 2
        if _total(shape, replace(s, tokens_per_microbatch=mid * TOKEN_GRANULE)) <= budget:
            best = max(best, mid * TOKEN_GRANULE)
            a = mid + 1
        else:
            z = mid - 1
    return best


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise PlanError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def plan_memory(
    model_config,
    gpu_memory_bytes: int,
    *,
    tokens_per_microbatch="auto",
    checkpointing="auto",
    master_weights="fp32",
    reference="cached",
    optimizer_in_backward="auto",
    tokens_per_step: int = DEFAULT_TOKENS_PER_STEP,
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
    weight_dtype: str = "bf16",
    gpus: int = 1,
    parallel: str = "ddp",
    lora_rank: int = 0,
    lora_targets=DEFAULT_LORA_TARGETS,
    optimizer_offload: str = "none",
    offload_update: str = "cpu",
    cuda_context_bytes: int = CUDA_CONTEXT_BYTES,
    find_smallest_gpus: bool = True,
) -> MemoryPlan:
    """Plan AltPO training memory per GPU (one GPU, DDP or FSDP over ``gpus``; see
    :mod:`altpo.plan.memory_plan_parallel` for the scale-out terms).

    Args:
        model_config: a named shape (``"llama-3.2-1b"``, ``"llama-3.2-3b"``, ``"llama-3.1-8b"``),
            a model folder or hub id, a transformers config, a config.json dict, or a ModelShape.
        gpu_memory_bytes: what PyTorch may allocate on the device.
        tokens_per_microbatch: an int, or ``"auto"`` (the largest that fits, in steps of 256).
        checkpointing: ``"none"``, ``"layers"``, ``"offload"`` or ``"auto"`` (the cheapest that
            fits a micro-batch of at least ``GOOD_TOKENS_PER_MICROBATCH`` tokens); True means
            layers or offload, whichever fits, False means none.
        master_weights: ``"fp32"``, ``"kahan"``, ``"none"`` or ``"auto"`` (fp32 if it fits, else
            kahan; never none).
        reference: ``"cached"`` or ``"resident"``.
        optimizer_in_backward: True, False or ``"auto"`` (False if it fits: it keeps gradient
            clipping by global norm and accumulation simple).
        tokens_per_step: tokens of one optimizer step (all micro-batches); matters when the
            optimizer steps in backward, where every micro-batch's activations are retained.
        max_seq_len: the longest packed sequence; a micro-batch holds at least this many tokens.
        weight_dtype: ``"bf16"``, ``"fp16"`` or ``"fp32"``.
        gpus, parallel: the number of GPUs and ``"ddp"`` (a whole model on each) or ``"fsdp"``
            (everything sharded over them); ``gpu_memory_bytes`` is the memory of each.
        lora_rank, lora_targets: LoRA adapters of that rank on those modules (0: full-parameter).
        optimizer_offload, offload_update: ``"cpu"`` puts master weights and moments in host
            memory; the update runs on the host (``"cpu"``) or streams to the GPU (``"stream"``).
        cuda_context_bytes: memory the CUDA context and library workspaces take outside
            PyTorch's allocations (counted; 0 when the budget was measured with it already made).
        find_smallest_gpus: also search the smallest number of GPUs that fits with FSDP.
    """
    shape = _as_shape(model_config)
    checkpointing, optimizer_in_backward = _check_plan_options(
        gpu_memory_bytes, checkpointing, master_weights, reference, optimizer_in_backward, weight_dtype,
        gpus, parallel, lora_rank, lora_targets, optimizer_offload, offload_update, max_seq_len,
        tokens_per_step, tokens_per_microbatch)
    lora_targets = tuple(lora_targets)

    def again(**changes) -> MemoryPlan:
        """This plan with some options changed (no search for the GPU count)."""
        args = dict(tokens_per_microbatch=tokens_per_microbatch, checkpointing=checkpointing,
                    master_weights=master_weights, reference=reference,
                    optimizer_in_backward=optimizer_in_backward, tokens_per_step=tokens_per_step,
                    max_seq_len=max_seq_len, weight_dtype=weight_dtype, gpus=gpus, parallel=parallel,
                    lora_rank=lora_rank, lora_targets=lora_targets,
                    optimizer_offload=optimizer_offload, offload_update=offload_update,
                    cuda_context_bytes=cuda_context_bytes, find_smallest_gpus=False)
        args.update(changes)
        return plan_memory(shape, gpu_memory_bytes, **args)

    masters = ["fp32", "kahan"] if master_weights == "auto" else [master_weights]
    in_bwd = [False, True] if optimizer_in_backward == "auto" else [optimizer_in_backward]
    ckpts = {"auto": list(CHECKPOINTING_MODES), "on": ["layers", "offload"]}.get(checkpointing, [checkpointing])
    candidates = [
        _Settings(0, c, m, reference, o, int(tokens_per_step), weight_dtype, gpus, parallel,
                  int(lora_rank), lora_targets, optimizer_offload, offload_update,
                  int(cuda_context_bytes))
        for m in masters for o in in_bwd for c in ckpts
    ]
    chosen = _choose_settings(shape, candidates, gpu_memory_bytes, tokens_per_microbatch,
                              int(max_seq_len), int(tokens_per_step))
    notes = []
    if chosen is not None:
        components, not_at_peak, details = _estimate(shape, chosen)
        plan = MemoryPlan(shape.name, gpu_memory_bytes, components, not_at_peak, details,
                          _settings_dict(chosen, shape), True, notes)
    else:
        t0 = tokens_per_microbatch if tokens_per_microbatch != "auto" else int(max_seq_len)
        plan = _smallest_plan(shape, candidates, t0, gpu_memory_bytes, notes)
        notes += _what_would_fit(plan, gpu_memory_bytes, again, master_weights, masters, reference,
                                 optimizer_offload, lora_rank)
    if find_smallest_gpus:
        plan.details["smallest_gpus"] = smallest_gpu_count(
            lambda n: (plan.fits if (n == gpus and parallel == "fsdp") else
                       again(gpus=n, parallel="fsdp" if n > 1 else parallel).fits), limit=1024)
        n = plan.details["smallest_gpus"]
        if not plan.fits and n is not None:
            notes.append(f"with --parallel fsdp this fits on {n} GPUs of {format_bytes(gpu_memory_bytes)}")
    notes += _setting_notes(plan)
    return plan


def _check_plan_options(gpu_memory_bytes, checkpointing, master_weights, reference, optimizer_in_backward,
                        weight_dtype, gpus, parallel, lora_rank, lora_targets, optimizer_offload,
                        offload_update, max_seq_len, tokens_per_step, tokens_per_microbatch):
    """Refuse bad options; returns ``checkpointing`` and ``optimizer_in_backward`` normalised."""
    if not isinstance(gpu_memory_bytes, int) or gpu_memory_bytes <= 0:
        raise PlanError(f"gpu_memory_bytes must be a positive int, got {gpu_memory_bytes!r}")
    # True/False: checkpoint (in whichever mode fits) or not
    if checkpointing is True:
        checkpointing = "on"
    elif checkpointing is False:
        checkpointing = "none"
    _check_choice("checkpointing", checkpointing, CHECKPOINTING_MODES + ("auto", "on"))
    _check_choice("master_weights", master_weights, MASTER_MODES + ("auto",))
    _check_choice("reference", reference, REFERENCE_MODES)
    _check_choice("optimizer_in_backward", optimizer_in_backward, (True, False, "auto"))
    _check_choice("weight_dtype", weight_dtype, tuple(DTYPE_BYTES))
    check_scale_options(gpus, parallel, lora_rank, lora_targets, optimizer_offload, offload_update)
    scaled = gpus > 1 or parallel == "fsdp" or optimizer_offload != "none" or lora_rank > 0
    if scaled and optimizer_in_backward is True:
        raise PlanError("the optimizer step in backward is single-GPU full-parameter training, "
                        "without FSDP, LoRA or offloaded states; plan with --optimizer-in-backward off")
    if scaled:
        optimizer_in_backward = False
    if int(max_seq_len) <= 0 or int(tokens_per_step) <= 0:
        raise PlanError("max_seq_len and tokens_per_step must be positive")
    if tokens_per_microbatch != "auto":
        if not isinstance(tokens_per_microbatch, int) or tokens_per_microbatch <= 0:
            raise PlanError(f"tokens_per_microbatch must be a positive int or 'auto', got {tokens_per_microbatch!r}")
        if tokens_per_microbatch < max_seq_len:
            raise PlanError(
                f"tokens_per_microbatch {tokens_per_microbatch} is below the longest sequence "
                f"({max_seq_len}); a packed micro-batch must hold one whole sequence"
            )
    return checkpointing, optimizer_in_backward


def _choose_settings(shape, candidates, gpu_memory_bytes: int, tokens_per_microbatch, lo: int,
                     tokens_per_step: int):
    """The first candidate that fits a good micro-batch (or the asked one), else the one that
    fits the largest; None when none fits at all."""
    hi = max(lo, tokens_per_step)
    good = min(GOOD_TOKENS_PER_MICROBATCH, hi)

    def best_tokens(s):
        if tokens_per_microbatch != "auto":
            t = tokens_per_microbatch
            return t if _total(shape, replace(s, tokens_per_microbatch=t)) <= gpu_memory_bytes else None
        return _largest_tokens(shape, s, gpu_memory_bytes, lo, hi)

    fallback = None
    for s in candidates:
        t = best_tokens(s)
        if t is None:
            continue
        if t >= good or tokens_per_microbatch != "auto":
            return replace(s, tokens_per_microbatch=t)
        if fallback is None or t > fallback.tokens_per_microbatch:
            fallback = replace(s, tokens_per_microbatch=t)
    return fallback


def _smallest_plan(shape, candidates, tokens: int, gpu_memory_bytes: int, notes: list) -> MemoryPlan:
    """Nothing fits: the smallest configuration, and the budget it would need."""
    sized = [replace(s, tokens_per_microbatch=tokens) for s in candidates]
    smallest = min(sized, key=lambda s: _total(shape, s))
    components, not_at_peak, details = _estimate(shape, smallest)
    plan = MemoryPlan(shape.name, gpu_memory_bytes, components, not_at_peak, details,
                      _settings_dict(smallest, shape), False, notes)
    plan.smallest_budget_bytes = plan.total_bytes
    plan.smallest_budget_settings = {
        k: plan.settings[k] for k in ("tokens_per_microbatch", "checkpointing", "master_weights",
                                      "optimizer_in_backward", "reference")
    }
    return plan


def _what_would_fit(plan: MemoryPlan, gpu_memory_bytes: int, again, master_weights, masters, reference,
                    optimizer_offload, lora_rank) -> list[str]:
    """Notes for a plan that does not fit: what takes the memory, and which change would fit."""
    notes = []
    components = plan.components
    static = components["weights"] + components["master_weights"] + components["optimizer_states"]
    if static > gpu_memory_bytes:
        notes.append(
            f"the weights, master weights and fp32 optimizer states alone take "
            f"{format_bytes(static)}, more than the {format_bytes(gpu_memory_bytes)} budget: "
            "full-parameter training of this model cannot fit on this device"
        )
    if master_weights == "fp32" and "kahan" not in masters:
        alt = again(master_weights="kahan")
        if alt.fits:
            notes.append("master_weights=kahan (bf16 weights with a bf16 compensation buffer: "
                         "exact updates at 2 fewer bytes per parameter) fits this budget")
    if reference == "resident":
        notes.append("reference=cached frees the reference weights during training")
    if optimizer_offload == "none" and again(optimizer_offload="cpu").fits:
        notes.append("--optimizer-offload cpu (master weights and moments in host memory) fits "
                     "this budget")
    if not lora_rank and again(lora_rank=16).fits:
        notes.append("--lora-rank 16 (LoRA adapters instead of every weight) fits this budget")
    return notes


def _setting_notes(plan: MemoryPlan) -> list[str]:
    """What the chosen optimizer-in-backward, offload and kahan settings mean."""
    notes = []
    s = plan.settings
    if s["optimizer_in_backward"]:
        notes.append(
            "optimizer in backward: each parameter is stepped and its gradient freed as soon as "
            "backward completes it; every micro-batch of a step runs forward first, then backward "
            "goes layer by layer over all micro-batches (no gradient accumulation). Exact clipping "
            "by the global gradient norm costs one extra backward (a norm-only first pass); "
            "single process only (altpo.train.optimizer_in_backward)"
        )
    if s["checkpointing"] == "offload":
        notes.append(
            "offload: layer checkpoints go to pinned CPU memory (torch.autograd.graph.save_on_cpu) "
            f"and come back in backward; host memory needed: "
            f"{format_bytes(plan.details['host_memory_for_offloaded_checkpoints'])}"
        )
    if s["master_weights"] == "kahan":
        notes.append("kahan: bf16 weights plus a bf16 compensation buffer (Kahan summation) give "
                     "exact small updates without fp32 master weights")
    return notes


def detect_gpu_memory() -> tuple[int, str] | None:
    """(free bytes, description) of the visible CUDA device, or None without one."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return None
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    name = torch.cuda.get_device_name()
    return int(free), f"free memory of {name} ({format_bytes(total)} in all)"
