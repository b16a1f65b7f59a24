"""Every setting of ``altpo-fast train``, its presets, and how flags, YAML and presets combine.

One :class:`TrainConfig` dataclass holds all settings; each field's metadata carries its help
text, so the command line (``--flag-name`` for field ``flag_name``), YAML config files
(``flag_name: value`` or ``flag-name: value``) and the Python API describe the same things.
Precedence, lowest first: the dataclass defaults, ``--preset``, ``--config FILE.yaml``, flags
given on the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from altpo.errors import UserError
from altpo.data.tofu import DEFAULT_DATE_STRING, DEFAULT_SYSTEM_PROMPT
from altpo.train.method_settings import (METHOD_NAMES, OPEN_UNLEARNING_PRESETS, fill_method_defaults,
                                         resolve_method_settings)

SEED_MODEL = "open-unlearning/tofu_Llama-3.2-1B-Instruct_full"
DEFAULT_CPU_TOKENS_PER_MICROBATCH = 2048
DEFAULT_GPU_TOKENS_PER_MICROBATCH = 8192


def _s(default, help: str, *, group: str, choices=None, metavar=None, kind=None):
    meta = {"help": help, "group": group, "choices": choices, "metavar": metavar, "kind": kind}
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """All settings of one AltPO training run (see ``altpo-fast train --help``)."""

    # model and data
    model: str | None = _s(None, "Model to unlearn, also the frozen reference: a save_pretrained "
                           "folder or a hub id. Required.", group="model and data", metavar="DIR|ID")
    tokenizer: str | None = _s(None, "Tokenizer folder or hub id (default: the model's). It needs a "
                               "chat template.", group="model and data", metavar="DIR|ID")
    data: str = _s("locuslab/TOFU", "TOFU data: a local folder of JSON Lines split files "
                   "(<split>.json, e.g. ../shared/data/tofu) or a hub dataset id.",
                   group="model and data", metavar="DIR|ID")
    forget_split: str = _s("forget10", "Forget split name (forget01, forget05, forget10).",
                           group="model and data", metavar="NAME")
    retain_split: str = _s("retain90", "Retain split name (the complement of the forget split: "
                           "retain99, retain95, retain90).", group="model and data", metavar="NAME")
    alternates: str | None = _s(None, "Alternate answers: JSON Lines with question, answer and "
                                "alternate (or sub_answer), K rows per forget question (make them "
                                "with `altpo-fast generate-alternates`). Required.",
                                group="model and data", metavar="FILE")
    max_forget_rows: int | None = _s(None, "Use only the first N forget questions (quick trials).",
                                     group="model and data", metavar="N")
    max_retain_rows: int | None = _s(None, "Use only the first N retain rows (quick trials).",
                                     group="model and data", metavar="N")
    system_prompt: str = _s(DEFAULT_SYSTEM_PROMPT, "System prompt of the chat template "
                            "(empty string: no system message).", group="model and data",
                            metavar="TEXT")
    date_string: str = _s(DEFAULT_DATE_STRING, "Value of the chat template's date_string "
                          "variable.", group="model and data", metavar="TEXT")
    max_length: int = _s(512, "Cut sequences (prompt + answer) to this many tokens; the run "
                         "reports how many were cut.", group="model and data", metavar="N")
    output: str | None = _s(None, "Output folder: final model (loads with "
                            "AutoModelForCausalLM.from_pretrained), checkpoints/, metrics.jsonl, "
                            "reference cache. Required.", group="model and data", metavar="DIR")

    # the step
    batch_size: int = _s(32, "Forget pairs (alternate + forget answer) per optimizer step, over "
                         "all processes; as many random retain rows are added.", group="step",
                         metavar="N")
    tokens_per_microbatch: str = _s("auto", "Token budget of one packed micro-batch (no "
                                    "padding: sequences are concatenated). auto: on a GPU the "
                                    "memory planner picks the largest budget that fits the free "
                                    "memory (with the checkpointing and master-weights settings); "
                                    f"on a CPU a fixed {DEFAULT_CPU_TOKENS_PER_MICROBATCH} (raised "
                                    "to the largest forget group when that is longer).",
                                    group="step", metavar="N|auto", kind="auto_int")
    beta: float | None = _s(None, "Inverse temperature of the forget term (altpo, dpo, idkdpo, npo, "
                            "simnpo). Default: the method's (altpo 0.5, dpo/idkdpo/npo 0.1, simnpo "
                            "4.5).", group="step", metavar="X")
    alpha: float | None = _s(None, "Weight of the retain NLL term. Default: the method's (altpo 2, "
                             "gradascent 0, others 1).", group="step", metavar="X")
    gamma: float | None = _s(None, "Weight of the forget term. Default: the method's (simnpo "
                             "0.125, others 1).", group="step", metavar="X")

    # unlearning method (docs/methods.md): the forget term, its data and its extra settings
    method: str = _s("altpo", "Unlearning method: altpo (alternates preferred over the forget "
                     "answers), dpo (the same loss with --alternates as the chosen answers), "
                     "idkdpo (DPO whose chosen answers are \"I don't know\" variants from "
                     "--idk-answers), npo, simnpo, graddiff, gradascent. All share the retain "
                     "term with --alpha.", group="step", choices=METHOD_NAMES)
    delta: float | None = _s(None, "SimNPO margin delta (default 0).", group="step", metavar="X")
    idk_answers: str | None = _s(None, "idkdpo: \"I don't know\" answers, one per line (one is "
                                 "drawn per forget row with --seed). Default: idontknow.jsonl in "
                                 "the --data folder.", group="model and data", metavar="FILE")

    # optimisation
    lr: float = _s(1e-5, "Peak learning rate (AdamW).", group="optimisation")
    epochs: float = _s(5.0, "Epochs over the forget pairs (an epoch is pairs // batch-size steps).",
                       group="optimisation")
    max_steps: int | None = _s(None, "Stop after this many optimizer steps (overrides --epochs for "
                               "the schedule's length).", group="optimisation", metavar="N")
    warmup_epochs: float = _s(1.0, "Linear warm-up length in epochs, then linear decay to 0 (HF's "
                              "linear schedule: with warm-up, the first step's rate is 0).",
                              group="optimisation")
    weight_decay: float = _s(0.01, "AdamW weight decay (not applied to norm weights and biases).",
                             group="optimisation")
    adam_beta1: float = _s(0.9, "AdamW beta1.", group="optimisation")
    adam_beta2: float = _s(0.999, "AdamW beta2.", group="optimisation")
    adam_eps: float = _s(1e-8, "AdamW epsilon.", group="optimisation")
    max_grad_norm: float = _s(1.0, "Clip the global gradient norm to this (0: no clipping).",
                              group="optimisation")
    seed: int = _s(0, "Seed of the data order, the retain draws and torch.", group="optimisation")
    dtype: str = _s("auto", "Weight dtype for training. auto: bf16 on CUDA, fp32 on CPU.",
                    group="optimisation", choices=("auto", "bf16", "fp32"))
    master_weights: str = _s("fp32", "Exact updates of bf16 weights: fp32 (fp32 master copy, +4 "
                             "bytes/param), kahan (Kahan-compensated bf16, +2 bytes/param), none "
                             "(plain bf16 AdamW; small updates round away), auto (the memory "
                             "planner's choice on a GPU: fp32 if it fits, else kahan; fp32 "
                             "elsewhere). No effect on fp32 weights.", group="optimisation",
                             choices=("fp32", "kahan", "none", "auto"))
    gradient_checkpointing: str = _s("auto", "Recompute each decoder layer in backward to save "
                                     "activation memory: on, off, offload (as on, and the kept "
                                     "layer inputs wait in pinned CPU memory), auto (the memory "
                                     "planner decides on a GPU; off on a CPU).",
                                     group="optimisation", choices=("auto", "on", "off", "offload"))
    optimizer_in_backward: str = _s("auto", "Update each parameter inside backward, as soon as its "
                                    "gradient is complete, and free that gradient: a step holds one "
                                    "decoder layer's gradients instead of the whole model's (2 "
                                    "bytes/param less in bf16). Every micro-batch runs forward first, "
                                    "then backward goes layer by layer; with gradient clipping on, "
                                    "backward runs twice (the first pass only measures the norm), so "
                                    "a step costs one extra backward. Same weights as off, to "
                                    "rounding. on, off, auto (the memory planner decides on a GPU; "
                                    "off on a CPU). Not with several processes (torchrun).",
                                    group="optimisation", choices=("auto", "on", "off"))

    # reference, kernels, device
    reference: str = _s("cached", "cached: reference log-probs computed once with the starting "
                        "weights, stored as safetensors, reused on reruns, no second model during "
                        "training. resident: keep a frozen copy of the model on the device and "
                        "score every step with it.", group="reference and device",
                        choices=("cached", "resident"))
    ref_cache: str | None = _s(None, "Reference log-prob cache file (default: "
                               "OUTPUT/reference_logprobs.safetensors). Point several runs at one "
                               "file to share it.", group="reference and device", metavar="FILE")
    attention: str = _s("auto", "Packed attention: flash (flash_attn varlen), torch-varlen "
                        "(torch.nn.attention.varlen), sdpa (per-sequence SDPA, any device); auto "
                        "picks the first available in that order.", group="reference and device",
                        choices=("auto", "flash", "torch-varlen", "sdpa"))
    loss_backend: str = _s("auto", "Fused loss backend: triton (CUDA), torch (chunked, CPU); auto "
                           "picks triton on CUDA.", group="reference and device",
                           choices=("auto", "triton", "torch"))
    device: str = _s("auto", "cpu, cuda, cuda:N, or auto (CUDA when available; under torchrun "
                     "each process takes cuda:LOCAL_RANK).", group="reference and device",
                     metavar="DEVICE")

    # checkpoints and output
    save_every: int = _s(0, "Write a full checkpoint (weights, optimizer, schedule, RNG, data "
                         "position) every N steps (0: only on interruption).",
                         group="checkpoints and output", metavar="N")
    keep_checkpoints: int = _s(2, "Keep the newest N checkpoints (0: keep all).",
                               group="checkpoints and output", metavar="N")
    resume: bool = _s(False, "Continue from the latest checkpoint in --output (same settings); "
                      "reaches the weights an uninterrupted run reaches.",
                      group="checkpoints and output")
    overwrite: bool = _s(False, "Start over in an --output folder that holds an earlier run "
                         "(its model, checkpoints and metrics are deleted; the reference cache "
                         "is kept and reused when it matches).", group="checkpoints and output")
    quiet: bool = _s(False, "No progress bar or summary; errors only.", group="checkpoints and output")

    # ---------------------------------------------------------------------------------------------

    def __post_init__(self):
        fill_method_defaults(self)  # unlearning method: its beta/alpha/gamma/delta when unset

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def micro_batch_tokens(self) -> int | None:
        """The fixed token budget, or None for 'auto'."""
        value = str(self.tokens_per_microbatch)
        return None if value == "auto" else int(value)

    def validate(self) -> "TrainConfig":
        """Check required settings and ranges; raise :class:`UserError` naming the flag."""
        for name in ("model", "output"):
            if not getattr(self, name):
                raise UserError(f"--{_flag(name)} is required ({_help(name).split('.')[0]})")
        resolve_method_settings(self)  # the method's defaults for beta/alpha/gamma/delta
        positive_ints = ("batch_size", "max_length")
        for name in positive_ints:
            if int(getattr(self, name)) < 1:
                raise UserError(f"--{_flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_forget_rows", "max_retain_rows"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise UserError(f"--{_flag(name)} must be at least 1, got {value}")
        for name in ("lr", "beta", "epochs"):
            if getattr(self, name) is not None and not float(getattr(self, name)) > 0:
                raise UserError(f"--{_flag(name)} must be positive, got {getattr(self, name)}")
        for name in ("alpha", "gamma", "weight_decay", "max_grad_norm", "warmup_epochs",
                     "save_every", "keep_checkpoints"):
            if float(getattr(self, name)) < 0:
                raise UserError(f"--{_flag(name)} must not be negative, got {getattr(self, name)}")
        if float(self.alpha) == 0 and float(self.gamma) == 0:
            raise UserError("--alpha and --gamma are both 0: the loss would be 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= float(getattr(self, name)) < 1:
                raise UserError(f"--{_flag(name)} must be in [0, 1), got {getattr(self, name)}")
        budget = self.micro_batch_tokens()
        if budget is not None and budget < 16:
            raise UserError(f"--tokens-per-microbatch must be 'auto' or at least 16, got {budget}")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other: pick one")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise UserError(f"--{_flag(f.name)} must be one of {', '.join(choices)}, got "
                                f"{getattr(self, f.name)!r}")
        return self


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _help(name: str) -> str:
    return FIELDS[name].metadata["help"]


# -------------------------------------------------------------------------------------------------
# presets

PRESETS: dict[str, dict[str, Any]] = {
    # DESIGN.md section 2: open-unlearning's AltPO run that made
    # unlearn_tofu_Llama-3.2-1B-Instruct_forget10_AltPO_lr1e-05_beta0.5_alpha2_epoch5
    "tofu-llama-3.2-1b-forget10": dict(
        model=SEED_MODEL, data="locuslab/TOFU", forget_split="forget10", retain_split="retain90",
        system_prompt=DEFAULT_SYSTEM_PROMPT, date_string=DEFAULT_DATE_STRING, max_length=512,
        batch_size=32, lr=1e-5, beta=0.5, alpha=2.0, gamma=1.0, epochs=5.0, warmup_epochs=1.0,
        weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8, max_grad_norm=1.0,
        seed=0, dtype="bf16", master_weights="fp32",
    ),
    # open-unlearning's published NPO, SimNPO, IdkDPO and GradDiff recipes (see method_settings.py)
    **OPEN_UNLEARNING_PRESETS,
}


# -------------------------------------------------------------------------------------------------
# values from strings (command line) and YAML


def _annotation_kind(f: dataclasses.Field) -> str:
    if f.metadata.get("kind"):
        return f.metadata["kind"]
    default = f.default
    t = str(f.type)
    if "bool" in t:
        return "bool"
    if "int" in t:
        return "int"
    if "float" in t:
        return "float"
    return "str" if not isinstance(default, (int, float)) else type(default).__name__


def convert_value(name: str, value: Any, source: str) -> Any:
    """Convert ``value`` (a string from the command line or a YAML scalar) for field ``name``."""
    f = FIELDS[name]
    kind = _annotation_kind(f)
    optional = "None" in str(f.type)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise UserError(f"{source}: {_flag(name)} cannot be empty")
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind == "auto_int":
            text = str(value).strip().lower()
            if text == "auto":
                return "auto"
            return str(int(text))
        choices = f.metadata.get("choices") or ()
        if isinstance(value, bool) and "on" in choices:
            return "on" if value else "off"  # YAML reads a bare on/off as a boolean
        return str(value)
    except (TypeError, ValueError):
        expected = {"bool": "true or false", "int": "an integer", "float": "a number",
                    "auto_int": "an integer or 'auto'"}.get(kind, "text")
        raise UserError(f"{source}: {_flag(name)} must be {expected}, got {value!r}") from None


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """Settings from a YAML file (keys: field names with _ or -, plus an optional ``preset``)."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"cannot read config file {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must be a mapping of setting: value, got {type(raw).__name__}")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name == "preset":
            out["preset"] = str(value)
            continue
        if name not in FIELDS:
            close = difflib.get_close_matches(name, list(FIELDS), n=1)
            hint = f" (did you mean {_flag(close[0])}?)" if close else ""
            raise UserError(f"config file {path}: unknown setting {key!r}{hint}")
        out[name] = convert_value(name, value, f"config file {path}")
    return out


def resolve_config(cli: dict[str, Any], *, preset: str | None = None,
                   config_file: str | Path | None = None) -> TrainConfig:
    """Defaults, then the preset, then the YAML file, then the command-line values in ``cli``.

    ``cli`` holds only the settings given on the command line (field name -> converted value).
    A preset named on the command line wins over one named in the YAML file.
    """
    from_file = load_yaml_config(config_file) if config_file else {}
    preset = preset or from_file.pop("preset", None)
    from_file.pop("preset", None)
    values: dict[str, Any] = {}
    if preset:
        if preset not in PRESETS:
            raise UserError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    values.update(from_file)
    values.update(cli)
    return TrainConfig(**values)


def config_summary(config: TrainConfig) -> str:
    """The settings as YAML text (what ``--print-config`` shows; loadable with ``--config``)."""
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def config_json(config: TrainConfig) -> str:
    return json.dumps(config.to_dict(), indent=2)


# settings that change the trajectory: a resumed run must agree on all of them
TRAJECTORY_SETTINGS = (
    "model", "tokenizer", "data", "forget_split", "retain_split", "alternates", "max_forget_rows",
    "max_retain_rows", "system_prompt", "date_string", "max_length", "batch_size", "beta", "alpha",
    "gamma", "lr", "epochs", "max_steps", "warmup_epochs", "weight_decay", "adam_beta1",
    "adam_beta2", "adam_eps", "max_grad_norm", "seed", "dtype", "master_weights", "reference",
    "method", "delta", "idk_answers",  # unlearning method
)
