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

from altpo_kernels.methods import REGISTRY

from altpo.demo.methods import COMPARE_METHODS
from altpo.cli.flags import add_overwrite
from altpo.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("--output", default="altpo-demo", metavar="DIR",
                        help="folder for everything the demo writes (default: ./altpo-demo); it "
                        "must be new or empty unless --overwrite is given")
    add_overwrite(parser, "use a non-empty --output folder: the demo's own files and folders in "
                  "it are replaced, nothing else is touched", dest="force")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the data, model initialisation, data order and sampling "
                        "(default 0)")
    parser.add_argument("--small", action="store_true",
                        help="the small preset: 20 authors instead of 40 (about half the time; "
                        "what the tests run)")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="torch CPU threads (default 1: the models are so small that more "
                        "threads gain little, and on busy cores they wait on each other)")
    parser.add_argument("--method", default="altpo", choices=list(REGISTRY),
                        help="unlearning method (default altpo; docs/methods.md), with the "
                        "demo's recipe for it")
    parser.add_argument("--compare", action="store_true",
                        help=f"run {', '.join(COMPARE_METHODS)} from the same full model and plot "
                        "their TOFU metrics side by side (demo_compare.png); about three times "
                        "as long as one method")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars, stage lines or report; errors only (the results "
                        "are in demo_summary.json, the exit status says whether forgetting held)")


def run(args) -> int:
    from altpo.demo.run import DemoError, run_demo

    if args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    try:
        summary = run_demo(args.output, preset="small" if args.small else "default",
                           seed=args.seed, force=args.force, progress=not args.quiet,
                           verbose=not args.quiet, threads=args.threads, method=args.method,
                           compare=COMPARE_METHODS if args.compare else None)
    except DemoError as err:
        raise UserError(str(err)) from None
    return 0 if summary["forgetting"]["held"] else 1
