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
from pathlib import Path

from altpo.eval.alternates import (
    ALTERNATE_PROMPT,
    AlternatesOutputExists,
    alternates_settings,
    unique_pairs,
    check_resumable,
    generate_alternates,
)
from altpo.cli.flags import add_overwrite
from altpo.errors import UserError
from altpo.model.loading import add_model_arguments, check_model_source, load_model_and_tokenizer
from altpo.data.tofu import ChatFormat, load_tofu_split


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True,
                        help="the starting model (finetuned on the full set): folder or hub id")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id, when not saved with the model")
    parser.add_argument("--data", required=True,
                        help="folder of TOFU JSON Lines files (e.g. fixtures/tofu) or a hub id (locuslab/TOFU)")
    parser.add_argument("--forget-split", default="forget10", help="forget split to answer (default forget10)")
    parser.add_argument("--k", type=int, default=5, help="alternates per question (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--output", required=True, help="JSON Lines file to write (question, answer, alternate)")
    add_overwrite(parser, "replace --output even if it was written with other settings", dest="force")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="sequences per generate call; batch_size // k questions per batch (default 32)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="longest alternate in tokens (default 200)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    parser.add_argument("--max-retries", type=int, default=5,
                        help="rounds of resampling for alternates that repeat the true answer (default 5)")
    parser.add_argument("--max-rows", type=int, default=None, help="only the first N forget questions (quick runs)")
    parser.add_argument("--prompt", default="altpo-fast", choices=("altpo-fast", "open-unlearning"),
                        help="altpo-fast (default): the chat template, asking for the same form with the facts "
                        "changed. open-unlearning: its generate.py prompt and stop strings, exactly (its "
                        "Llama-3 text template; --system-prompt and --date-string are then unused)")
    add_model_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from altpo.progress import interactive, third_party_bars

    with third_party_bars(not args.quiet and interactive()):  # --quiet: no third-party bars either
        return _run(args)


def _run(args) -> int:
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
                                                **options), args.force)
    except AlternatesOutputExists as err:
        raise UserError(str(err).replace("force (--force)", "--overwrite")) from None
    if resume:
        print(f"resuming {out}")

    from altpo.train.report import transformers_bars

    with transformers_bars(enabled=not args.quiet):  # --quiet: no loading bar either
        model, tokenizer = load_model_and_tokenizer(args.model, device=args.device, dtype=args.dtype,
                                                    tokenizer_source=args.tokenizer)
    try:
        report = generate_alternates(model, tokenizer, pairs, args.k, args.seed, out, force=args.force,
                                     system_prompt=fmt.system_prompt, date_string=fmt.date_string,
                                     progress=not args.quiet, **options)
    except AlternatesOutputExists as err:
        raise UserError(str(err)) from None
    print(report.describe())
    for question, kept in report.short[:5]:
        print(f"  kept {kept} of {args.k} alternates for: {question[:100]}")
    return 0
