"""``altpo-fast``: one entry point, one module per command.

Each command module defines ``add_arguments(parser)`` and ``run(args) -> int`` and a module
docstring whose first line is the command's one-line help. A command module imports no torch or
transformers at module level (its ``run`` does), and :func:`main` adds the flags of the command
being run only, so ``altpo-fast --help`` and ``altpo-fast train --help`` answer without loading
torch, and ``altpo-fast plan`` does not pay for the trainer.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module that implements it
COMMANDS = {
    "plan": "altpo.cli.plan",
    "train": "altpo.cli.train",
    "eval": "altpo.cli.eval",
    "generate-alternates": "altpo.cli.generate_alternates",
    "demo": "altpo.cli.demo",
}


from altpo.errors import UserError  # noqa: F401  (re-exported: ``from altpo.cli import UserError``)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; with ``only``, the flags of that command alone (the others
    keep their one-line help; their flags are added when they run)."""
    parser = argparse.ArgumentParser(
        prog="altpo-fast",
        description="Fast, lean AltPO unlearning: train, plan memory, evaluate on TOFU, "
        "generate alternate answers, and run an offline demo (benchmarks: see benchmarks/README.md).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.commands = {}
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or name).strip()
        p = sub.add_parser(
            name,
            help=doc.splitlines()[0],
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if only is None or only == name:
            module.add_arguments(p)
        p.set_defaults(_module=module)
        parser.commands[name] = p
    return parser


def main(argv=None) -> int:
    from altpo.cli.flags import unknown_flags_error

    words = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=next((w for w in words if not w.startswith("-")), ""))
    args, extra = parser.parse_known_args(argv)
    if extra:  # answered by the command's own parser: its usage, and a did-you-mean
        unknown_flags_error(parser.commands.get(getattr(args, "command", None), parser), extra)
    args._argv = ["altpo-fast", *(sys.argv[1:] if argv is None else argv)]  # for provenance records
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        code = int(args._module.run(args) or 0)
        sys.stdout.flush()  # inside the try: a closed pipe is reported here, not at exit
        return code
    except UserError as err:
        print(f"altpo-fast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"altpo-fast {args.command}: interrupted" + (f" ({err})" if str(err) else ""),
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`altpo-fast plan --json | head`): stop quietly
        _silence_stdout()
        return 141


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
