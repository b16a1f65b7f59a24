"""Run the offline end-to-end demo: invent authors, train a tiny Llama, unlearn with AltPO, measure.

No GPU, no hub, a few minutes on two CPU cores. The demo invents a fictitious-author data set in
TOFU's layout, trains a tokenizer and a tiny Llama on all of it (the full model) and a twin on the
retain part only (the retain model), samples alternate answers for the forget questions, runs
AltPO through the same code as `altpo-fast train`, evaluates the TOFU metrics before and after,
and says whether it forgot: forget_Q_A_Prob at most half of its starting value while
retain_Q_A_Prob stays within 10 %.

    altpo-fast demo                      # writes ./altpo-demo
    altpo-fast demo --output /tmp/demo --small --seed 1
    altpo-fast demo --method NAME        # any method of docs/methods.md instead of AltPO
    altpo-fast demo --compare            # AltPO, NPO and SimNPO from the same full model

Output: data/, full_model/, retain_model/, alternates.jsonl, unlearned_model/ (the trainer's
output folder), eval/{retain_model,before,after}/ (TOFU_EVAL.json, TOFU_SUMMARY.json),
demo_summary.json and demo_plot.png. With --compare: unlearned_models/<method>/,
eval/after_<method>/ and demo_compare.png (the methods' TOFU metrics side by side in one figure).
Exit status 0 when forgetting held (for every method with --compare), 1 when it did not.
"""

from __future__ import annotations

from dataclasses import dataclass

from altpo.cli.flags import add_flags, overwrite_setting, setting, settings_from_args
from altpo.errors import UserError


def _s(default, help: str, **kw):
    return setting(default, help, show_default=False, **kw)  # the help says the default


def demo_settings():
    """The settings of ``altpo-fast demo`` (built on use: the method list needs the registry)."""
    from altpo.demo.methods import COMPARE_METHODS
    from altpo.train.method_settings import builtin_methods, default_method

    @dataclass
    class DemoSettings:
        output: str = _s("altpo-demo", "folder for everything the demo writes (default: "
                         "./altpo-demo); it must be new or empty unless --overwrite is given",
                         metavar="DIR")
        overwrite: bool = overwrite_setting("use a non-empty --output folder: the demo's own files "
                                            "and folders in it are replaced, nothing else is touched")
        seed: int = _s(0, "seed of the data, model initialisation, data order and sampling "
                       "(default 0)")
        small: bool = _s(False, "the small preset: 20 authors instead of 40 (about half the time; "
                         "what the tests run)")
        threads: int = _s(1, "torch CPU threads (default 1: the models are so small that more "
                          "threads gain little, and on busy cores they wait on each other)",
                          metavar="N")
        method: str = _s(default_method(), f"unlearning method (default {default_method()}; "
                         "docs/methods.md), with the "
                         "demo's recipe for it", choices=list(builtin_methods()))
        compare: bool = _s(False, f"run {', '.join(COMPARE_METHODS)} from the same full model and "
                           "plot their TOFU metrics side by side (demo_compare.png); about three "
                           "times as long as one method")
        quiet: bool = _s(False, "no progress bars, stage lines or report; errors only (the results "
                         "are in demo_summary.json, the exit status says whether forgetting held)")

    return DemoSettings


def add_arguments(parser) -> None:
    add_flags(parser, demo_settings())


def run(args) -> int:
    from altpo.demo.methods import COMPARE_METHODS
    from altpo.demo.run import DemoError, run_demo

    args = settings_from_args(demo_settings(), args)
    if args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    try:
        summary = run_demo(args.output, preset="small" if args.small else "default",
                           seed=args.seed, force=args.overwrite, progress=not args.quiet,
                           verbose=not args.quiet, threads=args.threads, method=args.method,
                           compare=COMPARE_METHODS if args.compare else None)
    except DemoError as err:
        raise UserError(str(err)) from None
    return 0 if summary["forgetting"]["held"] else 1
