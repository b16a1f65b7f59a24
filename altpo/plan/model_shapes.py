"""Model shapes for the memory planner: the numbers of a decoder-only model that decide its memory.

:class:`ModelShape` holds them (hidden size, layers, heads, MLP and vocabulary sizes, tied
embeddings, biases); :data:`NAMED_SHAPES` has real configs by name; :func:`load_model_shape`
resolves a name, a local folder or a hub id. Also the byte-size parsing and printing the planner
and its command use.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from altpo.sources import hub_reachable, looks_like_hub_id

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

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of a decoder layer, by module name."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.q_width, self.kv_width
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def parameter_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every parameter tensor (a tied lm_head once) by its transformers name and shape."""
        h, v = self.hidden_size, self.vocab_size
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
        lin = self.linear_shapes()
        for layer in range(self.num_layers):
            pre = f"model.layers.{layer}."
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                fan_in, fan_out = lin[name]
                out.append((f"{pre}self_attn.{name}.weight", (fan_out, fan_in)))
                if self.attention_bias or (self.qkv_bias and name != "o_proj"):
                    out.append((f"{pre}self_attn.{name}.bias", (fan_out,)))
            for name in ("gate_proj", "up_proj", "down_proj"):
                fan_in, fan_out = lin[name]
                out.append((f"{pre}mlp.{name}.weight", (fan_out, fan_in)))
                if self.mlp_bias:
                    out.append((f"{pre}mlp.{name}.bias", (fan_out,)))
            out += [(f"{pre}input_layernorm.weight", (h,)),
                    (f"{pre}post_attention_layernorm.weight", (h,))]
        out.append(("model.norm.weight", (h,)))
        if not self.tie_word_embeddings:
            out.append(("lm_head.weight", (v, h)))
        return out

    def lora_parameters(self, rank: int, targets) -> int:
        """Parameters of rank-``rank`` LoRA adapters (A: r x in, B: out x r) on ``targets`` of
        every decoder layer."""
        lin = self.linear_shapes()
        unknown = [t for t in targets if t not in lin]
        if unknown:
            raise PlanError(f"LoRA targets {', '.join(unknown)} are not linear layers of a decoder "
                            f"layer ({', '.join(lin)})")
        return self.num_layers * sum(rank * (lin[t][0] + lin[t][1]) for t in targets)

    def largest_parameter(self) -> int:
        """Elements of the largest single parameter tensor."""
        h, i = self.hidden_size, self.intermediate_size
        return max(self.embedding_parameters(), h * i, h * self.q_width)


# Real configs (config.json of meta-llama/Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B, Llama-2-7b-hf).
NAMED_SHAPES = {
    "llama-3.2-1b": ModelShape("llama-3.2-1b", 2048, 16, 32, 8, 8192, 128256, True, 64),
    "llama-3.2-3b": ModelShape("llama-3.2-3b", 3072, 28, 24, 8, 8192, 128256, True, 128),
    "llama-3.1-8b": ModelShape("llama-3.1-8b", 4096, 32, 32, 8, 14336, 128256, False, 128),
    "llama-2-7b": ModelShape("llama-2-7b", 4096, 32, 32, 32, 11008, 32000, False, 128),
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
    signed = re.fullmatch(r"\s*([-+])\s*[0-9]*\.?[0-9]+\s*([A-Za-z]*)\s*", str(text))
    if signed and signed.group(1) == "-":
        raise PlanError(f"the size {text!r} is negative; a size must be positive, e.g. 16GiB or 80GB")
    m = re.fullmatch(r"\s*\+?\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]+)\s*", str(text))
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
