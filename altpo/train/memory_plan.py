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

import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from altpo.sources import hub_reachable, looks_like_hub_id

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


class PlanError(ValueError):
    """Bad input to the planner (unknown model, unreadable config, bad option)."""


# ----------------------------------------------------------------------------------------------
# model shapes


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only (Llama-family) model that decide its memory."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    head_dim: int | None = None
    model_type: str = "llama"
    attention_bias: bool = False  # llama/mistral: q, k, v and o projections carry biases
    qkv_bias: bool = False  # qwen2: only q, k and v carry biases
    mlp_bias: bool = False

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def q_width(self) -> int:
        return self.num_heads * self.hd

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.hd

    def layer_parameters(self) -> int:
        """Parameters of one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.q_width, self.kv_width
        n = h * q + 2 * h * kv + q * h  # q, k, v, o projections
        if self.attention_bias or self.qkv_bias:
            n += q + 2 * kv
        if self.attention_bias:
            n += h
        n += 3 * h * i  # gate, up, down
        if self.mlp_bias:
            n += 2 * i + h
        return n + 2 * h  # two RMSNorm weights

    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size

    def num_parameters(self) -> int:
        """Every parameter once (a tied lm_head shares the embedding)."""
        head = 0 if self.tie_word_embeddings else self.embedding_parameters()
        return self.embedding_parameters() + self.num_layers * self.layer_parameters() + self.hidden_size + head

    def largest_parameter(self) -> int:
        """Elements of the largest single parameter tensor."""
        h, i = self.hidden_size, self.intermediate_size
        return max(self.embedding_parameters(), h * i, h * self.q_width)


# Real configs (config.json of meta-llama/Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B).
NAMED_SHAPES = {
    "llama-3.2-1b": ModelShape("llama-3.2-1b", 2048, 16, 32, 8, 8192, 128256, True, 64),
    "llama-3.2-3b": ModelShape("llama-3.2-3b", 3072, 28, 24, 8, 8192, 128256, True, 128),
    "llama-3.1-8b": ModelShape("llama-3.1-8b", 4096, 32, 32, 8, 14336, 128256, False, 128),
}
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def shape_from_config(config: Any, name: str | None = None) -> ModelShape:
    """A :class:`ModelShape` from a transformers config object or a config.json dict."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    if get("text_config") is not None and get("hidden_size") is None:
        return shape_from_config(get("text_config"), name)
    model_type = get("model_type", "llama") or "llama"
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise PlanError(
            f"model_type {model_type!r} is not supported by the planner (supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}); give one of those or a named shape "
            f"({', '.join(NAMED_SHAPES)})"
        )
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size", "vocab_size") if get(k) is None]
    if missing:
        raise PlanError(f"model config {name or ''} lacks {', '.join(missing)}; is it a decoder-only LM config?")
    heads = int(get("num_attention_heads"))
    return ModelShape(
        name=name or get("_name_or_path") or model_type,
        hidden_size=int(get("hidden_size")),
        num_layers=int(get("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(get("num_key_value_heads") or heads),
        intermediate_size=int(get("intermediate_size")),
        vocab_size=int(get("vocab_size")),
        tie_word_embeddings=bool(get("tie_word_embeddings", model_type != "mistral")),
        head_dim=int(get("head_dim")) if get("head_dim") else None,
        model_type=model_type,
        attention_bias=bool(get("attention_bias", False)) and model_type != "qwen2",
        qkv_bias=model_type == "qwen2",
        mlp_bias=bool(get("mlp_bias", False)),
    )


def load_model_shape(model: str) -> ModelShape:
    """Resolve ``model``: a named shape, a local folder with config.json, or a hub id."""
    key = model.strip().lower()
    if key in NAMED_SHAPES:
        return NAMED_SHAPES[key]
    path = Path(model).expanduser()
    if path.exists():
        cfg = path / "config.json" if path.is_dir() else path
        if not cfg.is_file():
            raise PlanError(f"{path} has no config.json; give a model folder saved with save_pretrained")
        try:
            data = json.loads(cfg.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise PlanError(f"cannot read {cfg} as JSON ({err}); is it a transformers config.json?") from None
        return shape_from_config(data, name=str(path))
    if not looks_like_hub_id(model.strip()):
        raise PlanError(
            f"model {model!r} is not a named shape ({', '.join(NAMED_SHAPES)}), not an existing "
            "folder, and not a hub id of the form owner/name"
        )
    if not hub_reachable():
        raise PlanError(
            f"cannot load the config of {model!r}: the Hugging Face hub is not reachable (or "
            "HF_HUB_OFFLINE is set); give a local model folder or a named shape "
            f"({', '.join(NAMED_SHAPES)})"
        )
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise PlanError(f"cannot load the config of {model!r} from the hub: {err}") from None
    return shape_from_config(config, name=model)


def _as_shape(model_config) -> ModelShape:
    if isinstance(model_config, ModelShape):
        return model_config
    if isinstance(model_config, (str, os.PathLike)):
        return load_model_shape(str(model_config))
    return shape_from_config(model_config)


# ----------------------------------------------------------------------------------------------
# byte sizes


_SIZE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_bytes(text: str) -> int:
    """Parse a size such as ``16GiB``, ``80GB``, ``1.5 TiB`` or ``512MiB`` into bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]+)\s*", str(text))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise PlanError(
            f"cannot read the size {text!r}: write a number and a unit, e.g. 16GiB or 80GB "
            "(units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    value = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if value <= 0:
        raise PlanError(f"the size {text!r} must be positive")
    return int(value)


def format_bytes(n: float) -> str:
    """``n`` bytes as GiB/MiB/KiB with two decimals."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


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

    weights = p * b
    if s.master_weights == "fp32":
        master = 0 if b == 4 else p * 4
    elif s.master_weights == "kahan":
        master = 0 if b == 4 else p * b
    else:
        master = 0
    optimizer = p * 8
    if s.optimizer_in_backward:
        gradients = shape.layer_parameters() * b + (v_h * b if shape.tie_word_embeddings else 0)
    else:
        gradients = p * b
    reference = p * b if s.reference == "resident" else 0

    retained_full = layers * act["layer"] + act["final"]
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
        "optimizer_step_workspace": 8 * min(shape.largest_parameter(), OPTIMIZER_CHUNK_NUMEL),
    }
    if s.reference == "resident":
        transients["reference_forward_workspace"] = (b * (3 * shape.intermediate_size + 3 * h) + 4 * h) * t
    peak_name = max(transients, key=transients.get)

    components = {
        "weights": weights,
        "master_weights": master,
        "optimizer_states": optimizer,
        "gradients": gradients,
        "reference": reference,
        "activations": activations,
        peak_name: transients[peak_name],
    }
    dynamic = gradients + activations + transients[peak_name]
    components["allocator_slack"] = int(SLACK_FRACTION * dynamic) + SLACK_FIXED
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
    }
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
        lines = [f"memory plan: {self.model} ({self.details['num_parameters']:,} parameters), "
                 f"budget {format_bytes(self.gpu_memory_bytes)}", ""]
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
    }


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
) -> MemoryPlan:
    """Plan full-parameter AltPO training memory for one GPU.

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
    """
    shape = _as_shape(model_config)
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

    masters = ["fp32", "kahan"] if master_weights == "auto" else [master_weights]
    in_bwd = [False, True] if optimizer_in_backward == "auto" else [optimizer_in_backward]
    ckpts = {"auto": list(CHECKPOINTING_MODES), "on": ["layers", "offload"]}.get(checkpointing, [checkpointing])
    candidates = [
        _Settings(0, c, m, reference, o, int(tokens_per_step), weight_dtype)
        for m in masters for o in in_bwd for c in ckpts
    ]
    lo = int(max_seq_len)
    hi = max(lo, int(tokens_per_step))
    good = min(GOOD_TOKENS_PER_MICROBATCH, hi)

    def best_tokens(s):
        if tokens_per_microbatch != "auto":
            t = tokens_per_microbatch
            return t if _total(shape, replace(s, tokens_per_microbatch=t)) <= gpu_memory_bytes else None
        return _largest_tokens(shape, s, gpu_memory_bytes, lo, hi)

    chosen = None
    fallback = None
    for s in candidates:
        t = best_tokens(s)
        if t is None:
            continue
        if t >= good or tokens_per_microbatch != "auto":
            chosen = replace(s, tokens_per_microbatch=t)
            break
        if fallback is None or t > fallback.tokens_per_microbatch:
            fallback = replace(s, tokens_per_microbatch=t)
    chosen = chosen or fallback

    notes = []
    if chosen is not None:
        components, not_at_peak, details = _estimate(shape, chosen)
        plan = MemoryPlan(shape.name, gpu_memory_bytes, components, not_at_peak, details,
                          _settings_dict(chosen, shape), True, notes)
    else:
        # nothing fits: show the smallest configuration, and the budget it would need
        t0 = tokens_per_microbatch if tokens_per_microbatch != "auto" else lo
        sized = [replace(s, tokens_per_microbatch=t0) for s in candidates]
        smallest = min(sized, key=lambda s: _total(shape, s))
        components, not_at_peak, details = _estimate(shape, smallest)
        plan = MemoryPlan(shape.name, gpu_memory_bytes, components, not_at_peak, details,
                          _settings_dict(smallest, shape), False, notes)
        plan.smallest_budget_bytes = plan.total_bytes
        plan.smallest_budget_settings = {
            k: plan.settings[k] for k in ("tokens_per_microbatch", "checkpointing", "master_weights",
                                          "optimizer_in_backward", "reference")
        }
        static = components["weights"] + components["master_weights"] + components["optimizer_states"]
        if static > gpu_memory_bytes:
            notes.append(
                f"the weights, master weights and fp32 optimizer states alone take "
                f"{format_bytes(static)}, more than the {format_bytes(gpu_memory_bytes)} budget: "
                "full-parameter training of this model cannot fit on this device"
            )
        if master_weights == "fp32" and "kahan" not in masters:
            alt = plan_memory(shape, gpu_memory_bytes, tokens_per_microbatch=tokens_per_microbatch,
                              checkpointing=checkpointing, master_weights="kahan", reference=reference,
                              optimizer_in_backward=optimizer_in_backward, tokens_per_step=tokens_per_step,
                              max_seq_len=max_seq_len, weight_dtype=weight_dtype)
            if alt.fits:
                notes.append("master_weights=kahan (bf16 weights with a bf16 compensation buffer: "
                             "exact updates at 2 fewer bytes per parameter) fits this budget")
        if reference == "resident":
            notes.append("reference=cached frees the reference weights during training")
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
    return plan


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
