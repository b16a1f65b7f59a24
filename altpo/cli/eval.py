"""Evaluate a model on TOFU; write open-unlearning's TOFU_EVAL.json and TOFU_SUMMARY.json.

Computes forget quality, model utility, the forget / retain / real-author / world-fact
probabilities, ROUGE and truth ratios, the MIA AUCs with privleak, and extraction strength, as
open-unlearning defines them, and prints a table of the headline metrics.

    altpo-fast eval --model out/unlearned --data locuslab/TOFU --forget-split forget10 \\
        --retain-logs fixtures/tofu/eval_logs/tofu_Llama-3.2-1B-Instruct_retain90 \\
        --output out/unlearned/evals

forget_quality and privleak compare with the retain model's TOFU_EVAL.json (--retain-logs);
without it they are skipped (written as null). mia_reference compares with a second model
(--reference-model, open-unlearning uses the retain model).

--numerics open-unlearning masks every token equal to the pad token out of attention, as
open-unlearning's collator does (with pad = eos, each in-sequence <|eot_id|>), so the numbers
compare with its published logs; the default masks padding only.

Under torchrun (torchrun --nproc-per-node N -m altpo.cli eval ...) the work is split across the
processes; the result equals the single-process one and rank 0 writes it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from altpo.cli.flags import (add_flags, apply_threads, date_string_setting, device_setting,
                             dtype_setting, overwrite_setting, setting, settings_from_args,
                             system_prompt_setting, threads_setting)
from altpo.errors import UserError
from altpo.model.loading import check_model_source, load_model_and_tokenizer

GROUPS = ("forget", "retain", "ra", "wf", "mia", "gradnorm", "memorization", "reference")
DEFAULT_GROUPS = GROUPS[:-1]
NUMERICS = ("altpo-fast", "open-unlearning")


def _s(default, help: str, **kw):
    return setting(default, help, show_default=False, **kw)  # the help says the default


@dataclass
class EvalSettings:
    """The settings of ``altpo-fast eval``, one flag each."""

    model: str = _s(None, "model folder (save_pretrained output) or hub id", required=True)
    tokenizer: str | None = _s(None, "tokenizer folder or hub id, when it is not saved with the model")
    data: str = _s(None, "folder of TOFU JSON Lines files (e.g. fixtures/tofu) or a hub id "
                   "(locuslab/TOFU)", required=True)
    forget_split: str = _s("forget10", "forget split: forget01, forget05 or forget10 (default forget10)")
    holdout_split: str | None = _s(None, "holdout split for the MIA metrics (default: the forget "
                                   "split's name with 'forget' replaced by 'holdout')")
    retain_logs: str | None = _s(None, "folder (or file) with the retain model's TOFU_EVAL.json, for "
                                 "forget_quality and privleak; without it those two are skipped")
    output: str = _s(None, "folder to write TOFU_EVAL.json and TOFU_SUMMARY.json to", required=True)
    metrics: str | None = _s(None, f"comma-separated metric groups to compute, from {', '.join(GROUPS)} "
                             "(default: all but reference; reference too when --reference-model is given)")
    reference_model: str | None = _s(None, "second model for mia_reference (its loss is subtracted "
                                     "from this model's; open-unlearning uses the retain model); it "
                                     "must share the tokenizer")
    numerics: str = _s("altpo-fast", "altpo-fast (default): padding masked by position. "
                       "open-unlearning: every token equal to the pad token masked out of attention, "
                       "as its collator does (pad = eos masks each in-sequence end-of-turn token), to "
                       "compare with its published logs", choices=NUMERICS)
    batch_size: int = _s(16, "sequences per forward pass and prompts per generate call (default 16)")
    max_new_tokens: int = _s(200, "greedy generation budget for the ROUGE metrics (default 200)")
    max_rows: int | None = _s(None, "use only the first N rows of every split (a quick check, not "
                              "comparable with published numbers)")
    device: str = device_setting()
    dtype: str = dtype_setting()
    system_prompt: str = system_prompt_setting()
    date_string: str = date_string_setting()
    overwrite: bool = overwrite_setting("replace TOFU_EVAL.json / TOFU_SUMMARY.json already in --output")
    quiet: bool = _s(False, "no progress bars")
    threads: int | None = threads_setting()


def add_arguments(parser) -> None:
    add_flags(parser, EvalSettings)


def _check(args: EvalSettings) -> list[str]:
    """Every user-fixable problem, before the model loads."""
    from altpo.eval.tofu import check_tofu_source, load_retain_logs, required_splits

    if args.metrics is None:
        groups = list(GROUPS if args.reference_model else DEFAULT_GROUPS)
    else:
        groups = [g.strip() for g in args.metrics.split(",") if g.strip()]
    bad = [g for g in groups if g not in GROUPS]
    if bad or not groups:
        raise UserError(f"--metrics: unknown group(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(GROUPS)}")
    if "reference" in groups and not args.reference_model:
        raise UserError("--metrics reference (mia_reference) needs --reference-model, e.g. the retain model")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.max_rows is not None and args.max_rows < 1:
        raise UserError(f"--max-rows must be >= 1, got {args.max_rows}")
    check_model_source(args.model, "--model")
    if args.tokenizer:
        check_model_source(args.tokenizer, "--tokenizer")
    if args.reference_model:
        check_model_source(args.reference_model, "--reference-model")
    if {"mia", "gradnorm", "reference"} & set(groups) and not args.holdout_split and "forget" not in args.forget_split:
        raise UserError(f"--forget-split {args.forget_split}: cannot derive the holdout split; pass --holdout-split")
    try:
        check_tofu_source(args.data, required_splits(args.forget_split, groups, args.holdout_split))
    except FileNotFoundError as err:
        raise UserError(f"--data: {err}") from None
    if args.retain_logs is not None:
        p = Path(os.path.expanduser(args.retain_logs))
        if not p.exists():
            raise UserError(f"--retain-logs {args.retain_logs} does not exist; pass the folder holding the "
                            "retain model's TOFU_EVAL.json, or leave it out to skip forget_quality and privleak")
        try:
            logs = load_retain_logs(p)
            _check_retain_logs_split(logs, args, groups)
        except (FileNotFoundError, ValueError) as err:
            raise UserError(f"--retain-logs: {err}") from None
    from altpo.eval.output import check_output, refuse_training_folders

    refuse_training_folders(model=args.model, output=args.output)
    check_output(Path(os.path.expanduser(args.output)), args.overwrite)
    return groups


def _process_device(device: str) -> str:
    """Under torchrun each process takes its own GPU (cuda:LOCAL_RANK) when the device is auto."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device == "auto" and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def _check_retain_logs_split(logs, args, groups) -> None:
    """Logs of another forget split are refused (local data: the split's rows are counted)."""
    from altpo.eval.retain_logs_match import check_retain_logs_match
    from altpo.eval.tofu import load_tofu_rows

    if "forget" in groups and Path(os.path.expanduser(args.data)).is_dir():
        rows = load_tofu_rows(args.data, f"{args.forget_split}_perturbed")
        check_retain_logs_match(logs, args.forget_split, len(rows))


def run(args) -> int:
    from altpo.progress import interactive, third_party_bars

    settings = settings_from_args(EvalSettings, args)
    with third_party_bars(not settings.quiet and interactive()):  # --quiet: no third-party bars either
        return _run_with_lock(settings, getattr(args, "_argv", None))


def _run_with_lock(args: EvalSettings, command) -> int:
    """Rank 0 (the only process, or torchrun's first) holds the output folder's eval lock from
    before the model loads until the results are written; under it the output is checked again."""
    from altpo.eval.output import check_output, lock_output, unlock_output

    groups = _check(args)
    if int(os.environ.get("RANK", "0")) != 0:
        return _run(args, groups, command)
    out = Path(os.path.expanduser(args.output))
    created = not out.exists()
    fd = lock_output(out)
    try:
        check_output(out, args.overwrite)  # another eval may have finished since the check above
        return _run(args, groups, command)
    finally:
        unlock_output(out, fd, remove_folder=created)


def _run(args: EvalSettings, groups, command) -> int:
    from altpo.eval.output import provenance
    from altpo.eval.sharding import join_process_group
    from altpo.eval.tofu import TofuDataError, evaluate_tofu, required_splits
    from altpo.train.report import transformers_bars

    apply_threads(args.threads)  # after the checks: torch loads here
    device = _process_device(args.device)
    with transformers_bars(enabled=not args.quiet):
        model, tokenizer = load_model_and_tokenizer(args.model, device=device, dtype=args.dtype,
                                                    tokenizer_source=args.tokenizer)
        reference = None
        if args.reference_model:
            reference, _ = load_model_and_tokenizer(args.reference_model, device=device,
                                                    dtype=args.dtype,
                                                    tokenizer_source=args.tokenizer or args.model)
    shards, created = join_process_group(next(model.parameters()).device)
    record = None
    if shards.rank == 0:
        record = provenance(
            model_path=args.model, model=model, tokenizer_path=args.tokenizer or args.model,
            data=args.data, splits=required_splits(args.forget_split, groups, args.holdout_split),
            settings={
                "forget_split": args.forget_split, "holdout_split": args.holdout_split,
                "metrics": groups, "numerics": args.numerics, "max_rows": args.max_rows,
                "max_new_tokens": args.max_new_tokens, "dtype": args.dtype,
                "retain_logs": args.retain_logs, "reference_model": args.reference_model,
                "system_prompt": args.system_prompt, "date_string": args.date_string},
            command=command)
    try:
        evaluate_tofu(
            model, tokenizer, args.data, args.forget_split, retain_logs=args.retain_logs,
            output_dir=os.path.expanduser(args.output), batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens, system_prompt=args.system_prompt or None,
            date_string=args.date_string or None, splits=groups, holdout_split=args.holdout_split,
            max_rows=args.max_rows, progress=not args.quiet and shards.rank == 0, verbose=True,
            numerics=args.numerics, reference_model=reference, shards=shards, provenance=record,
        )
    except (TofuDataError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    finally:
        if created:
            import torch.distributed as tdist

            tdist.destroy_process_group()
    return 0

