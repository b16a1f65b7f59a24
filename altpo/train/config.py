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
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from altpo.errors import UserError
from altpo.data.tofu import DEFAULT_DATE_STRING, DEFAULT_SYSTEM_PROMPT
from altpo.train.method_settings import (OPEN_UNLEARNING_PRESETS, fill_method_defaults, method_help,
                                         resolve_method_settings, setting_help)

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
                   "(<split>.json, e.g. fixtures/tofu) or a hub dataset id.",
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
    beta: float | None = _s(None, "Inverse temperature of the forget term. " + setting_help("beta"),
                            group="step", metavar="X")
    alpha: float | None = _s(None, "Weight of the retain NLL term. " + setting_help("alpha"),
                             group="step", metavar="X")
    gamma: float | None = _s(None, "Weight of the forget term. " + setting_help("gamma"),
                             group="step", metavar="X")

    # unlearning method (docs/methods.md): the forget term, its data and its extra settings
    method: str = _s("altpo", method_help(), group="step", metavar="NAME|FILE.py:NAME")
    delta: float | None = _s(None, "Margin delta of the forget term. " + setting_help("delta"),
                             group="step", metavar="X")
    method_settings: str | None = _s(None, "Settings of your own method beyond beta/alpha/gamma/"
                                     "delta: NAME=X[,NAME=X] (its defaults otherwise).",
                                     group="step", metavar="NAME=X,...")
    idk_answers: str | None = _s(None, "For a method whose chosen answers are \"I don't know\" "
                                 "variants: those answers, one per line (one is drawn per forget "
                                 "row with --seed). Default: idontknow.jsonl in the --data folder.",
                                 group="model and data", metavar="FILE")

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
    master_weights: str = _s("auto", "Exact updates of bf16 weights: fp32 (fp32 master copy, +4 "
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

    # robustness: how long a process waits for the others in a collective before giving up
    dist_timeout: float = _s(600.0, "Seconds a process waits for the others in a collective "
                             "(under torchrun) before the run stops with a message naming the "
                             "stalled rank, instead of hanging.", group="reference and device",
                             metavar="SECONDS")
    # several GPUs, large models: FSDP, LoRA, optimizer states on the CPU
    parallel: str = _s("auto", "Several processes (torchrun): ddp (a whole model per process, "
                       "gradients all-reduced), fsdp (torch FSDP2: parameters, gradients and "
                       "optimizer states sharded over the processes, one fully_shard per decoder "
                       "layer; checkpoints through torch.distributed.checkpoint), auto (fsdp when "
                       "the memory planner says the model does not fit one GPU with ddp; else ddp).",
                       group="scale-out", choices=("auto", "ddp", "fsdp"))
    lora_rank: int = _s(0, "Train LoRA adapters of this rank (through peft) instead of every "
                        "weight (0: full-parameter training). The reference is the base model.",
                        group="scale-out", metavar="R")
    lora_alpha: float = _s(0.0, "LoRA scaling alpha (0: twice the rank).", group="scale-out")
    lora_targets: str = _s("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                           "Comma-separated module names that get LoRA adapters.",
                           group="scale-out", metavar="NAMES")
    merge: bool = _s(False, "With --lora-rank: also write the merged model (base + adapters) as "
                     "the save_pretrained folder in --output (the adapter is in OUTPUT/adapter).",
                     group="scale-out")
    optimizer_offload: str = _s("none", "cpu: keep AdamW moments and fp32 master weights in "
                                "(pinned) host memory instead of on the GPU; none: on the device.",
                                group="scale-out", choices=("none", "cpu"))
    offload_update: str = _s("cpu", "With --optimizer-offload cpu: where the update runs. cpu "
                             "(gradients go to the host, the host updates, the new weights come "
                             "back), stream (the states come to the GPU chunk by chunk, are "
                             "updated there and go back).", group="scale-out",
                             choices=("cpu", "stream"))

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

    # open-unlearning parity: its step numerics as an option, and evaluation during training
    numerics: str = _s("altpo-fast", "altpo-fast: the retain NLL is a mean over all retain answer "
                       "tokens of the step. open-unlearning: its HF-Trainer numerics, the retain NLL "
                       "averaged per loader micro-batch of --per-device-batch-size rows, divided by "
                       "the accumulation steps, pairs and retain rows grouped as its data loader "
                       "groups them (packing, the cached reference and exact updates stay on).",
                       group="step", choices=("altpo-fast", "open-unlearning"))
    per_device_batch_size: int = _s(8, "With --numerics open-unlearning: the rows of one of its "
                                    "loader micro-batches (its per_device_train_batch_size); "
                                    "--batch-size must be a multiple of it times the processes.",
                                    group="step", metavar="N")
    eval_every_epoch: str | None = _s(None, "After every epoch, evaluate these comma-separated TOFU "
                                      "metric groups (forget, retain, ra, wf, mia, gradnorm, "
                                      "memorization) on all processes, sharded, into "
                                      "OUTPUT/evals/epoch-N/ (TOFU_EVAL.json, TOFU_SUMMARY.json).",
                                      group="checkpoints and output", metavar="GROUPS")
    eval_retain_logs: str | None = _s(None, "The retain model's TOFU_EVAL.json (or its folder) for "
                                      "forget_quality and privleak in --eval-every-epoch.",
                                      group="checkpoints and output", metavar="PATH")
    eval_max_rows: int | None = _s(None, "--eval-every-epoch on the first N rows of each split only "
                                   "(quick, not comparable with published numbers).",
                                   group="checkpoints and output", metavar="N")
    keep_best: str | None = _s(None, "Keep the model of the best epoch by this metric of "
                               "--eval-every-epoch in OUTPUT/best/, beside the final model. "
                               "METRIC or METRIC:max / METRIC:min / METRIC:zero (closest to 0); "
                               "known metrics have a default direction (forget_quality, "
                               "model_utility: max; forget_Q_A_Prob, forget_Q_A_ROUGE, "
                               "extraction_strength: min; privleak: zero).",
                               group="checkpoints and output", metavar="METRIC")

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
        fill_method_defaults(self)  # the method's beta/alpha/gamma/delta where unset
        positive_ints = ("batch_size", "max_length")
        for name in positive_ints:
            if int(getattr(self, name)) < 1:
                raise UserError(f"--{_flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_forget_rows", "max_retain_rows"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise UserError(f"--{_flag(name)} must be at least 1, got {value}")
        for name in FLOAT_SETTINGS:  # None: a setting the method does not use (e.g. delta)
            if getattr(self, name) is not None and not math.isfinite(float(getattr(self, name))):
                raise UserError(f"--{_flag(name)} must be a finite number, got {getattr(self, name)}")
        for name in ("lr", "beta", "epochs"):
            if getattr(self, name) is not None and not float(getattr(self, name)) > 0:
                raise UserError(f"--{_flag(name)} must be positive, got {getattr(self, name)}")
        for name in ("alpha", "gamma", "weight_decay", "max_grad_norm", "warmup_epochs",
                     "save_every", "keep_checkpoints"):
            if getattr(self, name) is not None and float(getattr(self, name)) < 0:
                raise UserError(f"--{_flag(name)} must not be negative, got {getattr(self, name)}")
        resolve_method_settings(self)  # the method's record: unknown names and unused settings refused
        if float(self.alpha or 0) == 0 and float(self.gamma or 0) == 0:
            raise UserError("--alpha and --gamma are both 0: the loss would be 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= float(getattr(self, name)) < 1:
                raise UserError(f"--{_flag(name)} must be in [0, 1), got {getattr(self, name)}")
        budget = self.micro_batch_tokens()
        if budget is not None and budget < 16:
            raise UserError(f"--tokens-per-microbatch must be 'auto' or at least 16, got {budget}")
        if not float(self.dist_timeout) > 0:  # robustness: dist_timeout
            raise UserError(f"--dist-timeout must be positive (seconds), got {self.dist_timeout}")
        if int(self.lora_rank) < 0 or float(self.lora_alpha) < 0:
            raise UserError("--lora-rank and --lora-alpha must not be negative")
        if self.merge and not int(self.lora_rank):
            raise UserError("--merge merges LoRA adapters: it needs --lora-rank R")
        if int(self.lora_rank) and not [t for t in str(self.lora_targets).split(",") if t.strip()]:
            raise UserError("--lora-targets is empty: name the modules that get adapters, e.g. q_proj,v_proj")
        if self.parallel == "fsdp" and self.reference == "resident":
            raise UserError("--reference resident keeps a whole copy of the model on every process, "
                            "which --parallel fsdp exists to avoid; use --reference cached")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other: pick one")
        self._validate_parity()
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise UserError(f"--{_flag(f.name)} must be one of {', '.join(choices)}, got "
                                f"{getattr(self, f.name)!r}")
        return self


    def _validate_parity(self) -> None:
        """The open-unlearning parity settings (numerics, evaluation during training)."""
        if int(self.per_device_batch_size) < 1:
            raise UserError(f"--per-device-batch-size must be at least 1, got {self.per_device_batch_size}")
        if self.numerics == "open-unlearning":
            if int(self.batch_size) % int(self.per_device_batch_size):
                raise UserError(f"--numerics open-unlearning: --batch-size {self.batch_size} must be a "
                                f"multiple of --per-device-batch-size {self.per_device_batch_size}")
            if self.optimizer_in_backward == "on":
                raise UserError("--numerics open-unlearning needs --optimizer-in-backward off or auto")
        if self.eval_every_epoch is not None or self.keep_best is not None:
            from altpo.train.epoch_eval import check_epoch_eval

            check_epoch_eval(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

# robustness: every float setting must be finite (inf passes "> 0" and would train NaN weights)
FLOAT_SETTINGS = tuple(name for name, f in FIELDS.items() if "float" in str(f.type))

# robustness: names other trainers use for our settings, so a YAML key gets "did you mean"
SETTING_ALIASES = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size",
    "warmup_ratio": "warmup_epochs", "warmup": "warmup_epochs", "max_seq_length": "max_length",
    "model_name_or_path": "model", "model_path": "model", "output_dir": "output",
    "alternates_file": "alternates", "save_steps": "save_every", "save_total_limit": "keep_checkpoints",
    "max_grad_norm_clip": "max_grad_norm", "gradient_clipping": "max_grad_norm",
}


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _help(name: str) -> str:
    return FIELDS[name].metadata["help"]


# -------------------------------------------------------------------------------------------------
# presets

PRESETS: dict[str, dict[str, Any]] = {
    # docs/design.md section 2: open-unlearning's AltPO run that made
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
            close = ([SETTING_ALIASES[name]] if name in SETTING_ALIASES
                     else difflib.get_close_matches(name, list(FIELDS), n=1))
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
    "lora_rank", "lora_alpha", "lora_targets",
    "method", "delta", "method_settings", "idk_answers",  # unlearning method
)
TRAJECTORY_SETTINGS += ("numerics", "per_device_batch_size")  # open-unlearning parity
