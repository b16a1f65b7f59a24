"""Unlearn a forget set with AltPO: packed, fused-loss training with cached reference log-probs.

Takes a finetuned causal LM, TOFU forget and retain splits and K alternate answers per forget
question, and trains the model to prefer the alternates over the true forget answers while keeping
the retain answers: L = gamma * (-2/beta) mean log sigmoid(beta * delta) + alpha * retain NLL.
Writes a save_pretrained folder that loads with AutoModelForCausalLM.from_pretrained, plus
metrics.jsonl, train_summary.json and (with --save-every, or on SIGTERM/Ctrl-C) checkpoints.
Guide: docs/training.md.

Settings come from, lowest precedence first: the defaults shown below, --preset, --config
FILE.yaml (any setting, written as `setting_name: value`), and the flags on the command line.
Several processes: `torchrun --nproc-per-node N -m altpo.cli train ...` (data parallel; add
--parallel fsdp to shard the model over them). Large models: --lora-rank R, --optimizer-offload cpu.

examples:
  altpo-fast train --preset tofu-llama-3.2-1b-forget10 --alternates alt.jsonl --output run1
  altpo-fast train --model runs/tiny-tofu-model --data fixtures/tofu --forget-split forget01 \\
      --retain-split retain99 --max-retain-rows 200 --batch-size 8 --epochs 2 --lr 1e-3 \\
      --alternates fixtures/tofu/alternates/llama2-7b/forget01/alt5_seed_0.json \\
      --output runs/tiny-tofu-run
  altpo-fast train ... --resume      # continue after an interruption (SIGTERM/Ctrl-C save one)
  altpo-fast train --method NAME --model DIR --data DIR --output run2   # another method (docs/methods.md)
  altpo-fast train --method my_methods.py:HINGE ...    # your own method (docs/methods.md)
"""

from __future__ import annotations

import argparse
import sys

from altpo.cli.flags import THREADS_HELP, add_flags, apply_threads
from altpo.train.config import (
    FIELDS,
    PRESETS,
    SETTING_ALIASES,
    TrainConfig,
    config_summary,
    convert_value,
    resolve_config,
)

_GROUP_TITLES = ("model and data", "step", "optimisation", "reference and device",
                 "scale-out", "checkpoints and output")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`~altpo.train.config.TrainConfig` setting, plus --preset/--config."""
    general = parser.add_argument_group("settings sources")
    general.add_argument("--preset", choices=sorted(PRESETS), default=None,
                         help="Start from a named recipe. tofu-llama-3.2-1b-forget10: the "
                              "open-unlearning AltPO run on TOFU forget10 (model "
                              "open-unlearning/tofu_Llama-3.2-1B-Instruct_full, batch 32, lr 1e-5, "
                              "beta 0.5, alpha 2, 5 epochs, 1 warm-up epoch, bf16 with fp32 "
                              "master weights, seed 0); still needs --alternates and --output. "
                              "tofu-llama-3.2-1b-forget10-METHOD: "
                              "open-unlearning's published recipes of those methods (lr 1e-5, "
                              "batch 32, 10 epochs; docs/methods.md); they need --output only.")
    general.add_argument("--config", metavar="FILE.yaml", default=None,
                         help="YAML file of settings (names as below with _ or -, at the top level "
                              "or under their section as --print-config shows them, and optionally "
                              "preset). Command-line flags override it.")
    general.add_argument("--print-config", action="store_true",
                         help="Print the resolved settings as YAML (usable with --config) and exit.")
    groups = {title: parser.add_argument_group(title) for title in _GROUP_TITLES}
    add_flags(parser, TrainConfig.flat_fields(), groups=groups, given_only=True)
    groups["reference and device"].add_argument("--threads", type=int, default=None, metavar="N",
                                                help=THREADS_HELP)
    parser.setting_aliases = SETTING_ALIASES  # other trainers' names: "did you mean" for a flag


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` a parsed command line describes (preset < YAML < flags)."""
    given = {name: convert_value(name, getattr(args, name), f"--{name.replace('_', '-')}")
             for name in FIELDS if hasattr(args, name)}
    return resolve_config(given, preset=getattr(args, "preset", None),
                          config_file=getattr(args, "config", None))


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)  # each section checks its own values here
    if getattr(args, "print_config", False):
        sys.stdout.write(config_summary(config))
        return 0
    apply_threads(getattr(args, "threads", None))
    from altpo.train.loop import train

    result = train(config)  # judges the whole config (TrainConfig.validate) before any work
    if result.interrupted:
        print(f"altpo-fast train: interrupted by {result.interrupted} after step "
              f"{result.steps_done}; checkpoint {result.checkpoint}; continue with --resume",
              file=sys.stderr)
        return 143 if result.interrupted == "SIGTERM" else 130
    return 0
