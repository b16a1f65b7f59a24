"""What every command's flags share: one spelling per concept, old spellings still accepted with a
one-line note, and a misspelled flag answered with a suggestion and the command's own usage.

One vocabulary across commands:

- ``--overwrite``: replace output this tool wrote before (``--force`` is its old spelling);
- ``--dtype``: ``auto``, ``bf16``, ``fp16``, ``fp32`` (``bfloat16``, ``float16``, ``float32`` are
  the old spellings);
- ``--max-length``: tokens of one sequence, prompt plus answer (plan's ``--max-seq-len`` is the
  old spelling).
"""

from __future__ import annotations

import argparse
import difflib
import sys

DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
OLD_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


class OldSpelling(argparse.Action):
    """An old flag name: stores into the new flag's destination and says the new name once."""

    def __init__(self, option_strings, dest, new_flag: str, nargs=None, const=None, **kwargs):
        self.new_flag = new_flag
        if const is not None:
            kwargs["const"] = const
            nargs = 0
        super().__init__(option_strings, dest, nargs=nargs, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: note: {option_string} is now {self.new_flag} (the old spelling "
              "still works)", file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def add_old_spelling(parser, old: str, new: str, dest: str, *, flag: bool = False, **kwargs) -> None:
    """Accept ``old`` for the flag ``new`` (dest ``dest``), hidden from --help."""
    parser.add_argument(old, dest=dest, action=OldSpelling, new_flag=new, help=argparse.SUPPRESS,
                        default=argparse.SUPPRESS, **({"const": True} if flag else {}), **kwargs)


def add_overwrite(parser, help: str, dest: str = "overwrite") -> None:
    """``--overwrite`` (and the old ``--force``)."""
    parser.add_argument("--overwrite", dest=dest, action="store_true", help=help)
    add_old_spelling(parser, "--force", "--overwrite", dest, flag=True)


def dtype_value(text: str) -> str:
    """A --dtype value in the one spelling (old long names accepted with a note)."""
    if text in OLD_DTYPE_NAMES:
        print(f"altpo-fast: note: --dtype {text} is now --dtype {OLD_DTYPE_NAMES[text]} (the old "
              "spelling still works)", file=sys.stderr)
        return OLD_DTYPE_NAMES[text]
    return text


def unknown_flags_error(parser: argparse.ArgumentParser, extra: list[str]) -> None:
    """The command's own usage and 'unrecognized arguments', with a did-you-mean for each flag."""
    known = [s for action in parser._actions for s in action.option_strings
             if action.help is not argparse.SUPPRESS]
    from altpo.train.config import SETTING_ALIASES  # other trainers' names for our settings

    hints = []
    for word in extra:
        if word.startswith("--"):
            flag = word.split("=", 1)[0]
            alias = "--" + SETTING_ALIASES.get(flag[2:].replace("-", "_"), "").replace("_", "-")
            close = [alias] if alias in known else difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
            if close:
                hints.append(f"{flag} (did you mean {close[0]}?)")
    text = f"unrecognized arguments: {' '.join(extra)}"
    if hints:
        text += "; " + ", ".join(hints)
    parser.error(text)
