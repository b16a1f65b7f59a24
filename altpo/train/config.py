"""Every setting of ``altpo-fast train``, in sections; presets; how flags, YAML and presets combine.

The settings come in sections, one dataclass each (:class:`InputSettings`, :class:`StepSettings`,
:class:`OptimSettings`, :class:`RuntimeSettings`, :class:`ScaleOutSettings`,
:class:`CheckpointSettings`, :class:`ParitySettings`); each checks its own values when it is
built (types, ranges, choices, all declared in the fields' metadata). :class:`TrainConfig`
composes them and is also a flat view: ``TrainConfig(lr=1e-5, model=...)`` builds it from flat
names, ``config.lr`` reads (and ``config.lr = x`` writes) the setting in its section, and
:meth:`TrainConfig.to_dict` is the flat dict written to config.json and checkpoints. The rules
that join sections (required settings, the method's record, the scale-out and parity
combinations) live in :meth:`TrainConfig.validate`, which :func:`altpo.train.train` runs on a
fresh copy of the config it is given: the one place a whole config is judged.

Each field's metadata carries its help text, so the command line (``--flag-name`` for field
``flag_name``), YAML config files (``flag_name: value`` or ``flag-name: value``, flat or under a
section name such as ``optim:``) and the Python API describe the same things, and whether the
setting changes the training trajectory (``trajectory``: a resumed run must agree on those).
Precedence, lowest first: the dataclass defaults, ``--preset``, ``--config FILE.yaml``, flags
given on the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from altpo.cli.flags import OLD_DTYPE_NAMES, flag_name, setting, value_kind
from altpo.cli.flags import convert_value as _convert
from altpo.data.tofu import DEFAULT_DATE_STRING, DEFAULT_SYSTEM_PROMPT
from altpo.errors import UserError
from altpo.train.method_settings import (OPEN_UNLEARNING_PRESETS, default_method, fill_method_defaults,
                                         method_help,
                                         resolve_method_settings, setting_help)

SEED_MODEL = "open-unlearning/tofu_Llama-3.2-1B-Instruct_full"
DEFAULT_CPU_TOKENS_PER_MICROBATCH = 2048
DEFAULT_GPU_TOKENS_PER_MICROBATCH = 8192


def _s(default, help: str, *, group: str, trajectory: bool, choices=None, metavar=None, kind=None,
       at_least: int | None = None, positive: bool = False, nonneg: bool = False,
       old_values: dict[str, str] | None = None):
    """A training setting. ``trajectory`` is required: every setting says whether it changes the
    weights a run reaches (a resumed run must agree on those). ``at_least``/``positive``/``nonneg``:
    the range its section checks (floats are also checked to be finite)."""
    return setting(default, help, group=group, choices=choices, metavar=metavar, kind=kind,
                   old_values=old_values, trajectory=trajectory, at_least=at_least,
                   positive=positive, nonneg=nonneg)


class _Section:
    """A section of :class:`TrainConfig`: converts and checks its own values when built."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and not _holds_kind(f, value):
                value = _convert(f, value, type(self).__name__)
                object.__setattr__(self, f.name, value)
            _check_value(f, value)
        self.check()

    def check(self) -> None:
        """Rules between this section's own settings (none by default)."""


def _holds_kind(f: dataclasses.Field, value: Any) -> bool:
    kind = value_kind(f)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, float)
    return kind == "str" and isinstance(value, str)  # auto_int: always through the converter


def _check_value(f: dataclasses.Field, value: Any) -> None:
    """The range and choices a field's metadata declares; UserError naming the flag."""
    if value is None:  # an optional setting left unset (or one the method does not use)
        return
    flag, meta = flag_name(f.name), f.metadata
    if value_kind(f) == "float" and not math.isfinite(value):  # inf passes "> 0", trains NaN weights
        raise UserError(f"{flag} must be a finite number, got {value}")
    if meta.get("at_least") is not None and value < meta["at_least"]:
        raise UserError(f"{flag} must be at least {meta['at_least']}, got {value}")
    if meta.get("positive") and not value > 0:
        raise UserError(f"{flag} must be positive, got {value}")
    if meta.get("nonneg") and value < 0:
        raise UserError(f"{flag} must not be negative, got {value}")
    if meta.get("choices") and value not in meta["choices"]:
        raise UserError(f"{flag} must be one of {', '.join(meta['choices'])}, got {value!r}")


@dataclass
class InputSettings(_Section):
    """Model, data and output folder: what the run reads and where it writes."""

    model: str | None = _s(None, "Model to unlearn, also the frozen reference: a save_pretrained "
                           "folder or a hub id. Required.", group="model and data",
                           metavar="DIR|ID", trajectory=True)
    tokenizer: str | None = _s(None, "Tokenizer folder or hub id (default: the model's). It needs a "
                               "chat template.", group="model and data", metavar="DIR|ID",
                               trajectory=True)
    data: str = _s("locuslab/TOFU", "TOFU data: a local folder of JSON Lines split files "
                   "(<split>.json, e.g. fixtures/tofu) or a hub dataset id.",
                   group="model and data", metavar="DIR|ID", trajectory=True)
    forget_split: str = _s("forget10", "Forget split name (forget01, forget05, forget10).",
                           group="model and data", metavar="NAME", trajectory=True)
    retain_split: str = _s("retain90", "Retain split name (the complement of the forget split: "
                           "retain99, retain95, retain90).", group="model and data",
                           metavar="NAME", trajectory=True)
    alternates: str | None = _s(None, "Alternate answers: JSON Lines with question, answer and "
                                "alternate (or sub_answer), K rows per forget question (make them "
                                "with `altpo-fast generate-alternates`). Required.",
                                group="model and data", metavar="FILE", trajectory=True)
    max_forget_rows: int | None = _s(None, "Use only the first N forget questions (quick trials).",
                                     group="model and data", metavar="N", trajectory=True,
                                     at_least=1)
    max_retain_rows: int | None = _s(None, "Use only the first N retain rows (quick trials).",
                                     group="model and data", metavar="N", trajectory=True,
                                     at_least=1)
    system_prompt: str = _s(DEFAULT_SYSTEM_PROMPT, "System prompt of the chat template "
                            "(empty string: no system message).", group="model and data",
                            metavar="TEXT", trajectory=True)
    date_string: str = _s(DEFAULT_DATE_STRING, "Value of the chat template's date_string "
                          "variable.", group="model and data", metavar="TEXT", trajectory=True)
    max_length: int = _s(512, "Cut sequences (prompt + answer) to this many tokens; the run "
                         "reports how many were cut.", group="model and data", metavar="N",
                         trajectory=True, at_least=1)
    output: str | None = _s(None, "Output folder: final model (loads with "
                            "AutoModelForCausalLM.from_pretrained), checkpoints/, metrics.jsonl, "
                            "reference cache. Required.", group="model and data", metavar="DIR",
                            trajectory=False)


@dataclass
class StepSettings(_Section):
    """One optimizer step: its size, the unlearning method, its settings and its idk answers."""

    batch_size: int = _s(32, "Forget pairs (alternate + forget answer) per optimizer step, over "
                         "all processes; as many random retain rows are added.", group="step",
                         metavar="N", trajectory=True, at_least=1)
    tokens_per_microbatch: str = _s("auto", "Token budget of one packed micro-batch (no "
                                    "padding: sequences are concatenated). auto: on a GPU the "
                                    "memory planner picks the largest budget that fits the free "
                                    "memory (with the checkpointing and master-weights settings); "
                                    f"on a CPU a fixed {DEFAULT_CPU_TOKENS_PER_MICROBATCH} (raised "
                                    "to the largest forget group when that is longer).",
                                    group="step", metavar="N|auto", kind="auto_int",
                                    trajectory=False)
    beta: float | None = _s(None, "Inverse temperature of the forget term. " + setting_help("beta"),
                            group="step", metavar="X", trajectory=True, positive=True)
    alpha: float | None = _s(None, "Weight of the retain NLL term. " + setting_help("alpha"),
                             group="step", metavar="X", trajectory=True, nonneg=True)
    gamma: float | None = _s(None, "Weight of the forget term. " + setting_help("gamma"),
                             group="step", metavar="X", trajectory=True, nonneg=True)
    method: str = _s(default_method(), method_help(), group="step", metavar="NAME|FILE.py:NAME",
                     trajectory=True)
    delta: float | None = _s(None, "Margin delta of the forget term. " + setting_help("delta"),
                             group="step", metavar="X", trajectory=True)
    method_settings: str | None = _s(None, "Settings of your own method beyond beta/alpha/gamma/"
                                     "delta: NAME=X[,NAME=X] (its defaults otherwise).",
                                     group="step", metavar="NAME=X,...", trajectory=True)
    idk_answers: str | None = _s(None, "For a method whose chosen answers are \"I don't know\" "
                                 "variants: those answers, one per line (one is drawn per forget "
                                 "row with --seed). Default: idontknow.jsonl in the --data folder.",
                                 group="model and data", metavar="FILE", trajectory=True)

    def check(self) -> None:
        fill_method_defaults(self)  # unlearning method: its beta/alpha/gamma/delta when unset
        budget = self.micro_batch_tokens()
        if budget is not None and budget < 16:
            raise UserError(f"--tokens-per-microbatch must be 'auto' or at least 16, got {budget}")

    def micro_batch_tokens(self) -> int | None:
        """The fixed token budget, or None for 'auto'."""
        value = str(self.tokens_per_microbatch)
        return None if value == "auto" else int(value)


@dataclass
class OptimSettings(_Section):
    """The optimiser, its schedule and the weights' precision."""

    lr: float = _s(1e-5, "Peak learning rate (AdamW).", group="optimisation", trajectory=True,
                   positive=True)
    epochs: float = _s(5.0, "Epochs over the forget pairs (an epoch is pairs // batch-size steps).",
                       group="optimisation", trajectory=True, positive=True)
    max_steps: int | None = _s(None, "Stop after this many optimizer steps (overrides --epochs for "
                               "the schedule's length).", group="optimisation", metavar="N",
                               trajectory=True, at_least=1)
    warmup_epochs: float = _s(1.0, "Linear warm-up length in epochs, then linear decay to 0 (HF's "
                              "linear schedule: with warm-up, the first step's rate is 0).",
                              group="optimisation", trajectory=True, nonneg=True)
    weight_decay: float = _s(0.01, "AdamW weight decay (not applied to norm weights and biases).",
                             group="optimisation", trajectory=True, nonneg=True)
    adam_beta1: float = _s(0.9, "AdamW beta1.", group="optimisation", trajectory=True)
    adam_beta2: float = _s(0.999, "AdamW beta2.", group="optimisation", trajectory=True)
    adam_eps: float = _s(1e-8, "AdamW epsilon.", group="optimisation", trajectory=True)
    max_grad_norm: float = _s(1.0, "Clip the global gradient norm to this (0: no clipping).",
                              group="optimisation", trajectory=True, nonneg=True)
    seed: int = _s(0, "Seed of the data order, the retain draws and torch.", group="optimisation",
                   trajectory=True)
    dtype: str = _s("auto", "Weight dtype for training. auto: bf16 on CUDA, fp32 on CPU.",
                    group="optimisation", choices=("auto", "bf16", "fp32"), trajectory=True,
                    old_values=OLD_DTYPE_NAMES)
    master_weights: str = _s("auto", "Exact updates of bf16 weights: fp32 (fp32 master copy, +4 "
                             "bytes/param), kahan (Kahan-compensated bf16, +2 bytes/param), none "
                             "(plain bf16 AdamW; small updates round away), auto (the memory "
                             "planner's choice on a GPU: fp32 if it fits, else kahan; fp32 "
                             "elsewhere). No effect on fp32 weights.", group="optimisation",
                             choices=("fp32", "kahan", "none", "auto"), trajectory=True)
    gradient_checkpointing: str = _s("auto", "Recompute each decoder layer in backward to save "
                                     "activation memory: on, off, offload (as on, and the kept "
                                     "layer inputs wait in pinned CPU memory), auto (the memory "
                                     "planner decides on a GPU; off on a CPU).",
                                     group="optimisation",
                                     choices=("auto", "on", "off", "offload"), trajectory=False)
    optimizer_in_backward: str = _s("auto", "Update each parameter inside backward, as soon as its "
                                    "gradient is complete, and free that gradient: a step holds one "
                                    "decoder layer's gradients instead of the whole model's (2 "
                                    "bytes/param less in bf16). Every micro-batch runs forward first, "
                                    "then backward goes layer by layer; with gradient clipping on, "
                                    "backward runs twice (the first pass only measures the norm), so "
                                    "a step costs one extra backward. Same weights as off, to "
                                    "rounding. on, off, auto (the memory planner decides on a GPU; "
                                    "off on a CPU). Not with several processes (torchrun).",
                                    group="optimisation", choices=("auto", "on", "off"),
                                    trajectory=False)

    def check(self) -> None:
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"{flag_name(name)} must be in [0, 1), got {getattr(self, name)}")


@dataclass
class RuntimeSettings(_Section):
    """The reference, the kernels, the device and how long processes wait for each other."""

    reference: str = _s("cached", "cached: reference log-probs computed once with the starting "
                        "weights, stored as safetensors, reused on reruns, no second model during "
                        "training. resident: keep a frozen copy of the model on the device and "
                        "score every step with it.", group="reference and device",
                        choices=("cached", "resident"), trajectory=True)
    ref_cache: str | None = _s(None, "Reference log-prob cache file (default: "
                               "OUTPUT/reference_logprobs.safetensors). Point several runs at one "
                               "file to share it.", group="reference and device", metavar="FILE",
                               trajectory=False)
    attention: str = _s("auto", "Packed attention: flash (flash_attn varlen), torch-varlen "
                        "(torch.nn.attention.varlen), sdpa (per-sequence SDPA, any device); auto "
                        "picks the first available in that order.", group="reference and device",
                        choices=("auto", "flash", "torch-varlen", "sdpa"), trajectory=False)
    loss_backend: str = _s("auto", "Fused loss backend: triton (CUDA), torch (chunked, CPU); auto "
                           "picks triton on CUDA.", group="reference and device",
                           choices=("auto", "triton", "torch"), trajectory=False)
    device: str = _s("auto", "cpu, cuda, cuda:N, or auto (CUDA when available; under torchrun "
                     "each process takes cuda:LOCAL_RANK).", group="reference and device",
                     metavar="DEVICE", trajectory=False)
    dist_timeout: float = _s(600.0, "Seconds a process waits for the others in a collective "
                             "(under torchrun) before the run stops with a message naming the "
                             "stalled rank, instead of hanging.", group="reference and device",
                             metavar="SECONDS", trajectory=False, positive=True)


@dataclass
class ScaleOutSettings(_Section):
    """Several GPUs and large models: FSDP, LoRA, optimizer states on the host."""

    parallel: str = _s("auto", "Several processes (torchrun): ddp (a whole model per process, "
                       "gradients all-reduced), fsdp (torch FSDP2: parameters, gradients and "
                       "optimizer states sharded over the processes, one fully_shard per decoder "
                       "layer; checkpoints through torch.distributed.checkpoint), auto (fsdp when "
                       "the memory planner says the model does not fit one GPU with ddp; else ddp).",
                       group="scale-out", choices=("auto", "ddp", "fsdp"), trajectory=False)
    lora_rank: int = _s(0, "Train LoRA adapters of this rank (through peft) instead of every "
                        "weight (0: full-parameter training). The reference is the base model.",
                        group="scale-out", metavar="R", trajectory=True, nonneg=True)
    lora_alpha: float = _s(0.0, "LoRA scaling alpha (0: twice the rank).", group="scale-out",
                           trajectory=True, nonneg=True)
    lora_targets: str = _s("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                           "Comma-separated module names that get LoRA adapters.",
                           group="scale-out", metavar="NAMES", trajectory=True)
    merge: bool = _s(False, "With --lora-rank: also write the merged model (base + adapters) as "
                     "the save_pretrained folder in --output (the adapter is in OUTPUT/adapter).",
                     group="scale-out", trajectory=False)
    optimizer_offload: str = _s("none", "cpu: keep AdamW moments and fp32 master weights in "
                                "(pinned) host memory instead of on the GPU; none: on the device.",
                                group="scale-out", choices=("none", "cpu"), trajectory=False)
    offload_update: str = _s("cpu", "With --optimizer-offload cpu: where the update runs. cpu "
                             "(gradients go to the host, the host updates, the new weights come "
                             "back), stream (the states come to the GPU chunk by chunk, are "
                             "updated there and go back).", group="scale-out",
                             choices=("cpu", "stream"), trajectory=False)

    def check(self) -> None:
        if self.merge and not self.lora_rank:
            raise UserError("--merge merges LoRA adapters: it needs --lora-rank R")
        if self.lora_rank and not [t for t in self.lora_targets.split(",") if t.strip()]:
            raise UserError("--lora-targets is empty: name the modules that get adapters, e.g. q_proj,v_proj")


@dataclass
class CheckpointSettings(_Section):
    """Checkpoints, resuming and replacing an earlier run, and what the run prints."""

    save_every: int = _s(0, "Write a full checkpoint (weights, optimizer, schedule, RNG, data "
                         "position) every N steps (0: only on interruption).",
                         group="checkpoints and output", metavar="N", trajectory=False, nonneg=True)
    keep_checkpoints: int = _s(2, "Keep the newest N checkpoints (0: keep all).",
                               group="checkpoints and output", metavar="N", trajectory=False,
                               nonneg=True)
    resume: bool = _s(False, "Continue from the latest checkpoint in --output (same settings); "
                      "reaches the weights an uninterrupted run reaches.",
                      group="checkpoints and output", trajectory=False)
    overwrite: bool = _s(False, "Start over in an --output folder that holds an earlier run "
                         "(its model, checkpoints and metrics are deleted; the reference cache "
                         "is kept and reused when it matches).", group="checkpoints and output",
                         trajectory=False)
    quiet: bool = _s(False, "No progress bar or summary; errors only.",
                     group="checkpoints and output", trajectory=False)

    def check(self) -> None:
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other: pick one")


@dataclass
class ParitySettings(_Section):
    """open-unlearning parity: its step numerics as an option, and evaluation during training."""

    numerics: str = _s("altpo-fast", "altpo-fast: the retain NLL is a mean over all retain answer "
                       "tokens of the step. open-unlearning: its HF-Trainer numerics, the retain NLL "
                       "averaged per loader micro-batch of --per-device-batch-size rows, divided by "
                       "the accumulation steps, pairs and retain rows grouped as its data loader "
                       "groups them (packing, the cached reference and exact updates stay on); "
                       "with pad = eos, every in-sequence eos hidden from attention as its collator "
                       "hides it (needs --attention sdpa or auto).",
                       group="step", choices=("altpo-fast", "open-unlearning"), trajectory=True)
    per_device_batch_size: int = _s(8, "With --numerics open-unlearning: the rows of one of its "
                                    "loader micro-batches (its per_device_train_batch_size); "
                                    "--batch-size must be a multiple of it times the processes.",
                                    group="step", metavar="N", trajectory=True, at_least=1)
    eval_every_epoch: str | None = _s(None, "After every epoch, evaluate these comma-separated TOFU "
                                      "metric groups (forget, retain, ra, wf, mia, gradnorm, "
                                      "memorization) on all processes, sharded, into "
                                      "OUTPUT/evals/epoch-N/ (TOFU_EVAL.json, TOFU_SUMMARY.json).",
                                      group="checkpoints and output", metavar="GROUPS",
                                      trajectory=False)
    eval_retain_logs: str | None = _s(None, "The retain model's TOFU_EVAL.json (or its folder) for "
                                      "forget_quality and privleak in --eval-every-epoch.",
                                      group="checkpoints and output", metavar="PATH",
                                      trajectory=False)
    eval_max_rows: int | None = _s(None, "--eval-every-epoch on the first N rows of each split only "
                                   "(quick, not comparable with published numbers).",
                                   group="checkpoints and output", metavar="N", trajectory=False)
    keep_best: str | None = _s(None, "Keep the model of the best epoch by this metric of "
                               "--eval-every-epoch in OUTPUT/best/, beside the final model. "
                               "METRIC or METRIC:max / METRIC:min / METRIC:zero (closest to 0); "
                               "known metrics have a default direction (forget_quality, "
                               "model_utility: max; forget_Q_A_Prob, forget_Q_A_ROUGE, "
                               "extraction_strength: min; privleak: zero).",
                               group="checkpoints and output", metavar="METRIC", trajectory=False)



#: section name (an attribute of TrainConfig, and a YAML key) -> its dataclass
SECTIONS: dict[str, type] = {
    "io": InputSettings, "step": StepSettings, "optim": OptimSettings, "runtime": RuntimeSettings,
    "scale_out": ScaleOutSettings, "checkpoints": CheckpointSettings, "parity": ParitySettings,
}
#: every setting's field, flat, in section order (the flags and to_dict() follow this order)
FIELDS: dict[str, dataclasses.Field] = {f.name: f for cls in SECTIONS.values() for f in dataclasses.fields(cls)}
#: setting name -> the section that holds it
SECTION_OF: dict[str, str] = {f.name: name for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


@dataclass(init=False)
class TrainConfig:
    """All settings of one AltPO training run (see ``altpo-fast train --help``), in sections.

    Build it from flat names (``TrainConfig(model="m", lr=1e-5)``), from sections
    (``TrainConfig(optim=OptimSettings(lr=1e-5))`` or ``optim={"lr": 1e-5}``), or both (flat names
    win). Every setting reads and writes flat too: ``config.lr`` is ``config.optim.lr``.
    """

    io: InputSettings
    step: StepSettings
    optim: OptimSettings
    runtime: RuntimeSettings
    scale_out: ScaleOutSettings
    checkpoints: CheckpointSettings
    parity: ParitySettings

    def __init__(self, **settings: Any):
        values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for key, value in settings.items():  # sections first, then flat names over them
            if key in SECTIONS:
                given = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else dict(value)
                for name in given:
                    if SECTION_OF.get(name) != key:
                        raise TypeError(f"TrainConfig section {key} has no setting {name!r}"
                                        + _where(name))
                values[key].update(given)
        for key, value in settings.items():
            if key in SECTIONS:
                continue
            if key not in SECTION_OF:
                raise TypeError(f"TrainConfig got an unexpected setting {key!r}{_where(key)}")
            values[SECTION_OF[key]][key] = value
        for name, cls in SECTIONS.items():
            object.__setattr__(self, name, cls(**values[name]))

    def __getattr__(self, name: str) -> Any:  # only for names that are not attributes: settings
        section = SECTION_OF.get(name)
        if section is None or section not in self.__dict__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self.__dict__[section], name)

    def __setattr__(self, name: str, value: Any) -> None:
        section = SECTION_OF.get(name)
        if section is None:
            object.__setattr__(self, name, value)
        else:
            setattr(self.__dict__[section], name, value)

    def to_dict(self) -> dict[str, Any]:
        """The flat settings (what config.json and checkpoints hold)."""
        return {name: getattr(self, name) for name in FIELDS}

    def to_sections(self) -> dict[str, dict[str, Any]]:
        """The settings by section (what --print-config shows)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def micro_batch_tokens(self) -> int | None:
        """The fixed token budget, or None for 'auto'."""
        return self.step.micro_batch_tokens()

    def validate(self) -> "TrainConfig":
        """The rules that join sections (each section checked its own values when built); raise
        :class:`UserError` naming the flag. :func:`altpo.train.train` runs this once, on a copy."""
        for name in ("model", "output"):
            if not getattr(self, name):
                raise UserError(f"--{_flag(name)} is required ({_help(name).split('.')[0]})")
        resolve_method_settings(self)  # the method's record: unknown names and unused settings refused
        if float(self.alpha or 0) == 0 and float(self.gamma or 0) == 0:
            raise UserError("--alpha and --gamma are both 0: the loss would be 0")
        if self.parallel == "fsdp" and self.reference == "resident":
            raise UserError("--reference resident keeps a whole copy of the model on every process, "
                            "which --parallel fsdp exists to avoid; use --reference cached")
        if self.numerics == "open-unlearning":
            if self.batch_size % self.per_device_batch_size:
                raise UserError(f"--numerics open-unlearning: --batch-size {self.batch_size} must be a "
                                f"multiple of --per-device-batch-size {self.per_device_batch_size}")
            if self.optimizer_in_backward == "on":
                raise UserError("--numerics open-unlearning needs --optimizer-in-backward off or auto")
        if self.eval_every_epoch is not None or self.keep_best is not None:
            from altpo.train.epoch_eval import check_epoch_eval

            check_epoch_eval(self)
        return self

    @staticmethod
    def flat_fields() -> list[dataclasses.Field]:
        """Every setting's field, in section order (one flag each)."""
        return list(FIELDS.values())


# settings that change the trajectory (their fields say trajectory=True): a resumed run must
# agree on all of them
TRAJECTORY_SETTINGS = tuple(name for name, f in FIELDS.items() if f.metadata["trajectory"])

# robustness: names other trainers use for our settings, so a YAML key gets "did you mean"
SETTING_ALIASES = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size",
    "warmup_ratio": "warmup_epochs", "warmup": "warmup_epochs", "max_seq_length": "max_length",
    "model_name_or_path": "model", "model_path": "model", "output_dir": "output",
    "alternates_file": "alternates", "save_steps": "save_every", "save_total_limit": "keep_checkpoints",
    "max_grad_norm_clip": "max_grad_norm", "gradient_clipping": "max_grad_norm",
}


def _where(name: str) -> str:
    """' (it is in section optim)' or ' (did you mean lr?)' for a misplaced or misspelled name."""
    if name in SECTION_OF:
        return f" (it is in section {SECTION_OF[name]})"
    close = ([SETTING_ALIASES[name]] if name in SETTING_ALIASES
             else difflib.get_close_matches(name, list(FIELDS), n=1))
    return f" (did you mean {_flag(close[0])}?)" if close else ""


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


def convert_value(name: str, value: Any, source: str) -> Any:
    """Convert ``value`` (a string from the command line or a YAML scalar) for setting ``name``."""
    return _convert(FIELDS[name], value, source)


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """Settings from a YAML file: setting names (with _ or -) at the top level or under their
    section's name (``optim: {lr: 1e-5}``), plus an optional ``preset``. Returns flat names."""
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
        elif name in SECTIONS and isinstance(value, dict):
            for inner, inner_value in value.items():
                setting_name = str(inner).replace("-", "_")
                if SECTION_OF.get(setting_name) != name:
                    raise UserError(f"config file {path}: section {key} has no setting "
                                    f"{inner!r}{_where(setting_name)}")
                out[setting_name] = convert_value(setting_name, inner_value, f"config file {path}")
        elif name in FIELDS:
            out[name] = convert_value(name, value, f"config file {path}")
        else:
            raise UserError(f"config file {path}: unknown setting {key!r}{_where(name)}")
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
    """The settings as YAML by section (what ``--print-config`` shows; loadable with ``--config``)."""
    import yaml

    return yaml.safe_dump(config.to_sections(), sort_keys=False)


def config_json(config: TrainConfig) -> str:
    return json.dumps(config.to_dict(), indent=2)
