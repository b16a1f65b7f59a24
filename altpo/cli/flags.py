"""Settings dataclasses to command-line flags and back, for every command, and what flags share.

Each command's settings are a dataclass whose fields carry metadata (:func:`setting`): help text,
choices, metavar, the argument group, old spellings. :func:`add_flags` turns any of them into
argparse flags (``--flag-name`` for field ``flag_name``; a ``bool`` field is a switch) and
:func:`settings_from_args` turns the parsed flags back into the dataclass. This module imports
neither torch nor transformers, so building a parser (and ``--help``) stays fast.

One vocabulary across commands:

- ``--overwrite``: replace output this tool wrote before (``--force`` is its old spelling);
- ``--dtype``: ``auto``, ``bf16``, ``fp16``, ``fp32`` (``bfloat16``, ``float16``, ``float32`` are
  the old spellings);
- ``--max-length``: tokens of one sequence, prompt plus answer (plan's ``--max-seq-len`` is the
  old spelling);
- ``--threads``: torch CPU threads, by default the CPUs this process may use divided by the
  processes per node (:func:`default_threads`).

A misspelled flag is answered with a suggestion and the command's own usage
(:func:`unknown_flags_error`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
from typing import Any, Iterable

from altpo.errors import UserError

DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
OLD_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def setting(default: Any = None, help: str = "", *, group: str | None = None, choices=None,
            metavar: str | None = None, kind: str | None = None, old: Iterable[str] = (),
            old_values: dict[str, str] | None = None, required: bool = False, type=None,
            show_default: bool = True, **extra) -> Any:
    """A dataclass field that is also a flag. ``old``: old spellings of the flag (accepted with a
    note, hidden from --help); ``old_values``: old spellings of values (the same); ``type``: an
    argparse converter; ``extra``: more metadata for the caller (e.g. constraints)."""
    meta = {"help": help, "group": group, "choices": choices, "metavar": metavar, "kind": kind,
            "old": tuple(old), "old_values": old_values or {}, "required": required, "type": type,
            "show_default": show_default, **extra}
    return dataclasses.field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def value_kind(f: dataclasses.Field) -> str:
    """bool, int, float, str, or the field's own ``kind`` (e.g. auto_int)."""
    if f.metadata.get("kind"):
        return f.metadata["kind"]
    t = str(f.type)
    for kind in ("bool", "int", "float"):
        if kind in t:
            return kind
    return "str"


def convert_value(f: dataclasses.Field, value: Any, source: str) -> Any:
    """``value`` (a command-line string or a YAML scalar) as field ``f`` holds it."""
    kind = value_kind(f)
    optional = "None" in str(f.type)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise UserError(f"{source}: {flag_name(f.name)[2:]} cannot be empty")
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
            return "auto" if text == "auto" else str(int(text))
        choices = f.metadata.get("choices") or ()
        if isinstance(value, bool) and "on" in choices:
            return "on" if value else "off"  # YAML reads a bare on/off as a boolean
        return _new_value(f, str(value))
    except (TypeError, ValueError):
        expected = {"bool": "true or false", "int": "an integer", "float": "a number",
                    "auto_int": "an integer or 'auto'"}.get(kind, "text")
        raise UserError(f"{source}: {flag_name(f.name)[2:]} must be {expected}, got {value!r}") from None


def _new_value(f: dataclasses.Field, text: str) -> str:
    """An old spelling of a value in its one spelling, with a one-line note."""
    new = f.metadata.get("old_values", {}).get(text)
    if new is None:
        return text
    print(f"altpo-fast: note: {flag_name(f.name)} {text} is now {flag_name(f.name)} {new} (the old "
          "spelling still works)", file=sys.stderr)
    return new


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


def settings_fields(settings) -> list[dataclasses.Field]:
    """The flag-bearing fields of a settings dataclass (or the fields themselves, as given)."""
    if dataclasses.is_dataclass(settings):
        return list(dataclasses.fields(settings))
    return list(settings)


def add_flags(parser: argparse.ArgumentParser, settings, *, groups: dict | None = None,
              given_only: bool = False) -> None:
    """One flag per field of ``settings`` (a dataclass, or a list of its fields).

    ``groups``: group title -> argparse group, for fields whose metadata names a group.
    ``given_only``: flags not given stay off the namespace and are left as text (the caller
    converts them and layers them over other sources, as ``train`` does with presets and YAML);
    otherwise each flag has its field's default and argparse converts ints and floats.
    """
    for f in settings_fields(settings):
        meta = f.metadata
        target = (groups or {}).get(meta.get("group"), parser)
        flag = flag_name(f.name)
        kind = value_kind(f)
        default = argparse.SUPPRESS if given_only else _default(f)
        if kind == "bool":
            target.add_argument(flag, dest=f.name, action="store_true", default=default,
                                help=meta["help"])
        else:
            shown = ""
            if meta.get("show_default", True) and _default(f) is not None and not meta.get("required"):
                shown = f" (default: {_default(f)})"
            kwargs: dict[str, Any] = dict(dest=f.name, default=default, help=meta["help"] + shown)
            if meta.get("required") and not given_only:
                kwargs["required"] = True
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
            elif kind in ("int", "float") and given_only:
                kwargs["metavar"] = "N" if kind == "int" else "X"
            converter = meta.get("type") or ({"int": int, "float": float}.get(kind) if not given_only else None)
            if meta.get("old_values"):
                converter = (lambda text, f=f: _new_value(f, text))
            if converter is not None:
                kwargs["type"] = converter
            target.add_argument(flag, **kwargs)
        for old in meta.get("old", ()):
            add_old_spelling(target, old, flag, f.name, flag=kind == "bool",
                             **({"type": kwargs["type"]} if kind != "bool" and "type" in kwargs else {}))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def settings_from_args(cls, args: argparse.Namespace):
    """The ``cls`` instance the parsed flags describe (fields absent from ``args``: defaults)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def dtype_value(text: str) -> str:
    """A --dtype value in the one spelling (old long names accepted with a note)."""
    if text in OLD_DTYPE_NAMES:
        print(f"altpo-fast: note: --dtype {text} is now --dtype {OLD_DTYPE_NAMES[text]} (the old "
              "spelling still works)", file=sys.stderr)
        return OLD_DTYPE_NAMES[text]
    return text


# -------------------------------------------------------------------------------------------------
# --threads

THREADS_HELP = ("torch CPU threads (default: the CPUs this process may use, divided by the "
                "processes per node under torchrun, at least 1)")


def default_threads() -> int:
    """The CPUs this process may use (its affinity), divided by torchrun's processes per node."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        per_node = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        per_node = 1
    return max(1, cpus // per_node)


def apply_threads(threads: int | None) -> int:
    """Set torch's CPU thread count (``None``: :func:`default_threads`); returns the count."""
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    count = default_threads() if threads is None else int(threads)
    import torch

    torch.set_num_threads(count)
    return count


# -------------------------------------------------------------------------------------------------
# misspelled flags


def unknown_flags_error(parser: argparse.ArgumentParser, extra: list[str]) -> None:
    """The command's own usage and 'unrecognized arguments', with a did-you-mean for each flag.

    A parser may carry ``setting_aliases`` (other tools' names for its settings, e.g.
    ``learning_rate`` -> ``lr``)."""
    known = [s for action in parser._actions for s in action.option_strings
             if action.help is not argparse.SUPPRESS]
    aliases = getattr(parser, "setting_aliases", {})
    hints = []
    for word in extra:
        if word.startswith("--"):
            flag = word.split("=", 1)[0]
            alias = "--" + aliases.get(flag[2:].replace("-", "_"), "").replace("_", "-")
            close = [alias] if alias in known else difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
            if close:
                hints.append(f"{flag} (did you mean {close[0]}?)")
    text = f"unrecognized arguments: {' '.join(extra)}"
    if hints:
        text += "; " + ", ".join(hints)
    parser.error(text)


# -------------------------------------------------------------------------------------------------
# settings several commands share (one definition each, so they read alike everywhere)


def overwrite_setting(help: str) -> Any:
    """``--overwrite`` (``--force`` is its old spelling)."""
    return setting(False, help, old=("--force",))


def threads_setting() -> Any:
    """``--threads N`` (None: :func:`default_threads`, applied by :func:`apply_threads`)."""
    return setting(None, THREADS_HELP, metavar="N", kind="int", show_default=False)


def device_setting() -> Any:
    return setting("auto", "one of auto, cpu, cuda or cuda:N (default auto)", show_default=False)


def dtype_setting(help: str = "model weights dtype (default auto: bf16 on a GPU, fp32 on the CPU)",
                  default: str = "auto") -> Any:
    """``--dtype``: auto, bf16, fp16, fp32 (the old bfloat16/float16/float32 with a note)."""
    return setting(default, help, choices=DTYPE_CHOICES, old_values=OLD_DTYPE_NAMES,
                   show_default=False)


def system_prompt_setting() -> Any:
    from altpo.data.tofu import DEFAULT_SYSTEM_PROMPT

    return setting(DEFAULT_SYSTEM_PROMPT, "chat template system prompt ('' for none; default "
                   f"{DEFAULT_SYSTEM_PROMPT!r})", show_default=False)


def date_string_setting() -> Any:
    from altpo.data.tofu import DEFAULT_DATE_STRING

    return setting(DEFAULT_DATE_STRING, f"chat template date string (default {DEFAULT_DATE_STRING!r})",
                   show_default=False)
