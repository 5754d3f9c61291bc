"""One dataclass per script; every field becomes a CLI flag (`--lr 1e-6`); presets set sizes.

Precedence: dataclass defaults (the paper's values) < `--preset NAME` < explicit flags.
Booleans take `--flag` / `--no-flag`. The dataclass is the one source of the help: a field's
comment (on its line, and the comment lines right below it with no blank line between) is its help
text, and a field typed `Literal[...]` accepts exactly those values.

`run(main)` is how every entry script starts: a user's mistake (`DataError`, `ConfigError`) ends as
one line, `error: <message>`, and exit status 2; `TAGPR_TRACEBACK=1` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import os
import sys
import textwrap
import tokenize
import typing
from typing import Any

from .files import DataError

TRACEBACK_ENV = "TAGPR_TRACEBACK"


class ConfigError(ValueError):
    """A flag, preset or setting that cannot be used as given (said before any work)."""


def field_help(cls) -> dict[str, str]:
    """Each field's comment in the class source: `name: type = default  # help`, continued by the comment-only
    lines right below it (no blank line between: a comment after a blank line is the class's own). Fields without
    a comment are missing from the result."""
    out: dict[str, str] = {}
    current, last = None, 0  # the field whose help is being read, and the line its help reached
    try:
        lines = inspect.getsource(cls).splitlines(keepends=True)
    except (OSError, TypeError):  # no source (e.g. typed at a prompt)
        return out
    for tok in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
        row = tok.start[0]
        if (
            tok.type == tokenize.NAME
            and tok.start[1] == 4
            and current != tok.string
            and lines[row - 1][4:].startswith(tok.string + ":")
        ):
            current, last = tok.string, row  # a field's line (class body indent)
        elif tok.type == tokenize.NAME and tok.start[1] == 4:
            current = None
        elif tok.type == tokenize.COMMENT and current is not None:
            own_line = not lines[row - 1][: tok.start[1]].strip()
            if own_line and row != last + 1:  # after a blank line or code: not this field's
                current = None
                continue
            text = tok.string.lstrip("#").strip()
            out[current] = f"{out[current]} {text}" if current in out and own_line else out.get(current, text)
            last = row
    return out


def _choices(hint) -> tuple | None:
    return typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None


def _show(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written; flag helps wrapped at spaces only, so that a default such as
    'zero-shot,rag' is never split at its hyphen."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def parser(cls, presets: dict[str, dict[str, Any]], description: str | None = None) -> argparse.ArgumentParser:
    """The script's argparse parser, built from `cls`: one flag a field, help from its comment, default once."""
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    ap = argparse.ArgumentParser(description=description, formatter_class=_Formatter)
    if presets:
        ap.add_argument(
            "--preset",
            choices=sorted(presets),
            default=None,
            help="named sizes (each sets some of the flags below); explicit flags win",
        )
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f"{helps.get(f.name, '')} (default: {_show(default)})".strip()
        hint, choices = hints[f.name], _choices(hints[f.name])
        if hint is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
            continue
        typ = type(choices[0]) if choices else hint if hint in (int, float, str) else str
        metavar = None if choices else {int: "N", float: "X"}.get(typ, "STR")
        ap.add_argument(flag, type=typ, choices=choices, default=None, help=text, metavar=metavar)
    return ap


def parse(cls, presets: dict[str, dict[str, Any]], argv=None, description: str | None = None):
    """(config, preset name) from the command line `argv` (default: sys.argv[1:])."""
    args = parser(cls, presets, description).parse_args(sys.argv[1:] if argv is None else argv)
    preset = getattr(args, "preset", None)
    values = dict(presets.get(preset, {})) if preset else {}
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - fields
    if unknown:
        raise ConfigError(f"preset {preset!r} sets unknown fields {sorted(unknown)}")
    values.update({k: v for k, v in vars(args).items() if k in fields and v is not None})
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        choices = _choices(hints[name])
        if choices and value not in choices:  # a preset's value, say
            raise ConfigError(f"--{name.replace('_', '-')} {value!r}: expected one of {', '.join(map(str, choices))}")
    return cls(**values), preset


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def run(main, argv=None):
    """Call `main(argv)`; a user's mistake ends as `error: <message>` on stderr and exit status 2, without a
    traceback (set TAGPR_TRACEBACK=1 to see it). Anything else is a bug and keeps its traceback."""
    try:
        return main(argv)
    except (DataError, ConfigError) as e:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
