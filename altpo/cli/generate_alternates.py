"""Sample AltPO alternate answers (facts changed) for every forget question, as JSON Lines.

The model answers each forget question again, prompted to keep the true answer's form but change
its facts; K samples per question at temperature 1.0, at most 200 new tokens. Samples that
repeat the true answer are drawn again (--max-retries rounds). Each output row holds
question, answer (the true one) and alternate.

    altpo-fast generate-alternates --model out/full --data locuslab/TOFU \\
        --forget-split forget10 --k 5 --seed 0 --output out/alternates_forget10.jsonl

--prompt open-unlearning uses open-unlearning's generate.py prompt instead (its raw Llama-3
text template, "Alternate Answer :" priming and stop strings; see docs/open-unlearning.md).

An interrupted run continues where it stopped when run again with the same settings; an output
written with other settings is only replaced with --overwrite.
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


def _s(default, help: str, **kw):
    return setting(default, help, show_default=False, **kw)  # the help says the default


@dataclass
class AlternatesSettings:
    """The settings of ``altpo-fast generate-alternates``, one flag each."""

    model: str = _s(None, "the starting model (finetuned on the full set): folder or hub id",
                    required=True)
    tokenizer: str | None = _s(None, "tokenizer folder or hub id, when not saved with the model")
    data: str = _s(None, "folder of TOFU JSON Lines files (e.g. fixtures/tofu) or a hub id "
                   "(locuslab/TOFU)", required=True)
    forget_split: str = _s("forget10", "forget split to answer (default forget10)")
    k: int = _s(5, "alternates per question (default 5)")
    seed: int = _s(0, "random seed (default 0)")
    output: str = _s(None, "JSON Lines file to write (question, answer, alternate)", required=True)
    overwrite: bool = overwrite_setting("replace --output even if it was written with other settings")
    batch_size: int = _s(32, "sequences per generate call; batch_size // k questions per batch "
                         "(default 32)")
    max_new_tokens: int = _s(200, "longest alternate in tokens (default 200)")
    temperature: float = _s(1.0, "sampling temperature (default 1.0)")
    top_p: float = _s(1.0, "nucleus sampling mass (default 1.0: off)")
    max_retries: int = _s(5, "rounds of resampling for alternates that repeat the true answer "
                          "(default 5)")
    max_rows: int | None = _s(None, "only the first N forget questions (quick runs)")
    prompt: str = _s("altpo-fast", "altpo-fast (default): the chat template, asking for the same "
                     "form with the facts changed. open-unlearning: its generate.py prompt and stop "
                     "strings, exactly (its Llama-3 text template; --system-prompt and --date-string "
                     "are then unused)", choices=("altpo-fast", "open-unlearning"))
    device: str = device_setting()
    dtype: str = dtype_setting()
    system_prompt: str = system_prompt_setting()
    date_string: str = date_string_setting()
    quiet: bool = _s(False, "no progress bar")
    threads: int | None = threads_setting()


def add_arguments(parser) -> None:
    add_flags(parser, AlternatesSettings)


def run(args) -> int:
    from altpo.progress import interactive, third_party_bars

    settings = settings_from_args(AlternatesSettings, args)
    with third_party_bars(not settings.quiet and interactive()):  # --quiet: no third-party bars either
        return _run(settings)


def _run(args: AlternatesSettings) -> int:
    from altpo.data.tofu import ChatFormat, load_tofu_split
    from altpo.eval.alternates import (ALTERNATE_PROMPT, AlternatesOutputExists, alternates_settings,
                                       check_resumable, generate_alternates, unique_pairs)

    if args.k < 1:
        raise UserError(f"--k must be >= 1, got {args.k}")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise UserError("--batch-size and --max-new-tokens must be >= 1")
    if args.max_retries < 0:
        raise UserError(f"--max-retries must be >= 0, got {args.max_retries}")
    if args.temperature <= 0:
        raise UserError(f"--temperature must be > 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_rows is not None and args.max_rows < 1:
        raise UserError(f"--max-rows must be >= 1, got {args.max_rows}")
    check_model_source(args.model, "--model")
    if args.tokenizer:
        check_model_source(args.tokenizer, "--tokenizer")
    rows = load_tofu_split(args.data, args.forget_split)
    rows = rows if args.max_rows is None else rows[: args.max_rows]
    out = Path(os.path.expanduser(args.output))
    if out.is_dir():
        raise UserError(f"--output {args.output} is a folder; pass a file path such as {out / 'alternates.jsonl'}")
    fmt = ChatFormat(args.system_prompt or None, args.date_string or None)
    pairs = unique_pairs(rows)
    options = dict(model_id=args.model, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_p=args.top_p, top_k=None, max_retries=args.max_retries,
                   prompt_style=args.prompt)
    try:  # refuse before the model loads
        resume = check_resumable(out, alternates_settings(pairs, args.k, args.seed, fmt=fmt, prompt=ALTERNATE_PROMPT,
                                                **options), args.overwrite)
    except AlternatesOutputExists as err:
        raise UserError(str(err).replace("force (--force)", "--overwrite")) from None
    if resume:
        print(f"resuming {out}")

    from altpo.train.report import transformers_bars

    apply_threads(args.threads)  # after the checks: torch loads here
    with transformers_bars(enabled=not args.quiet):  # --quiet: no loading bar either
        model, tokenizer = load_model_and_tokenizer(args.model, device=args.device, dtype=args.dtype,
                                                    tokenizer_source=args.tokenizer)
    try:
        report = generate_alternates(model, tokenizer, pairs, args.k, args.seed, out, force=args.overwrite,
                                     system_prompt=fmt.system_prompt, date_string=fmt.date_string,
                                     progress=not args.quiet, **options)
    except AlternatesOutputExists as err:
        raise UserError(str(err)) from None
    print(report.describe())
    for question, kept in report.short[:5]:
        print(f"  kept {kept} of {args.k} alternates for: {question[:100]}")
    return 0
