"""One dataclass per script; every field becomes a CLI flag (`--lr 1e-6`); presets set sizes.

Precedence: dataclass defaults (the paper's values) < `--preset NAME` < explicit flags.
Booleans take `--flag` / `--no-flag`. A numeric field typed `Annotated[int, Range(1)]` accepts only that range
(every float must also be finite), checked before any work and shown in `--help`. The dataclass is the one source
of the help: a field's
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
import math
import os
import sys
import textwrap
import tokenize
import typing
from typing import Annotated, Any

from .files import DataError

TRACEBACK_ENV = "TAGPR_TRACEBACK"
CHECK_ARGS_ENV = "TAGPR_CHECK_ARGS"  # 1: parse and check the arguments, then exit 0 without any work


class ConfigError(ValueError):
    """A flag, preset or setting that cannot be used as given (said before any work)."""


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric flag accepts: lo ≤ x ≤ hi (either end open, or absent), or one of `also` (a special
    value such as -1 for "all")."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    also: tuple = ()

    def accepts(self, x) -> bool:
        if x in self.also:
            return True
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        return not (self.hi is not None and (x >= self.hi if self.hi_open else x > self.hi))

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            text = f"{'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text = f"{'>' if self.lo_open else '≥'} {_num(self.lo)}"
        else:
            text = f"{'<' if self.hi_open else '≤'} {_num(self.hi)}"
        return " or ".join([*map(_num, self.also), text])


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


# the ranges the scripts use
COUNT = Range(1)  # a positive integer
NON_NEGATIVE = Range(0)  # 0 or more (0 often means "none" or "off")
POSITIVE = Range(0, lo_open=True)  # a real number > 0
FRACTION = Range(0, 1)  # a share in [0, 1]
AT_LEAST_ONE = Range(1)  # a real number ≥ 1 (a cap on a ratio)
ALL_OR_COUNT = Range(1, also=(-1,))  # -1 for "all", else ≥ 1
NO_CAP_OR_COUNT = Range(0, also=(-1,))  # -1 for "no cap", else ≥ 0 (0: export the start model)
TOP_P = Range(0, 1, lo_open=True)  # a nucleus share in (0, 1]


def _numeric(hint) -> tuple[type | None, Range | None]:
    """(int or float, its range) of a field's type hint (`Annotated[int, Range(1)]` or plain); (None, None) else."""
    base, extras = (
        (typing.get_args(hint)[0], typing.get_args(hint)[1:]) if typing.get_origin(hint) is Annotated else (hint, ())
    )
    rng = next((x for x in extras if isinstance(x, Range)), None)
    return (base, rng) if base in (int, float) else (None, None)


def field_help(cls) -> dict[str, str]:
    """Each field's comment in the class source: `name: type = default  # help`, continued by the comment-only
    lines right below it (no blank line between: a comment after a blank line is the class's own). Fields without
    a comment are missing from the result. A dataclass that subclasses another inherits its helps; its own win."""
    out: dict[str, str] = {}
    for base in reversed(cls.__mro__[1:]):
        if dataclasses.is_dataclass(base):
            out.update(_own_field_help(base))
    out.update(_own_field_help(cls))
    return out


def _own_field_help(cls) -> dict[str, str]:
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
    ranges = {name: _numeric(h)[1] for name, h in typing.get_type_hints(cls, include_extras=True).items()}
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
        accepted = f"{ranges[f.name]}; " if ranges.get(f.name) else ""
        text = f"{helps.get(f.name, '')} ({accepted}default: {_show(default)})".strip()
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
    extras = typing.get_type_hints(cls, include_extras=True)
    for name, value in values.items():
        flag = f"--{name.replace('_', '-')}"
        choices = _choices(hints[name])
        if choices and value not in choices:  # a preset's value, say
            raise ConfigError(f"{flag} {value!r}: expected one of {', '.join(map(str, choices))}")
        base, rng = _numeric(extras[name])
        if base is float and not math.isfinite(value):
            raise ConfigError(f"{flag} {value!r}: expected a finite number")
        if rng is not None and not rng.accepts(value):
            raise ConfigError(f"{flag} {value!r}: expected {rng}")
    cfg = cls(**values)
    if os.environ.get(CHECK_ARGS_ENV) == "1":  # bench/gpu_check.sh --dry: the arguments are checked, nothing runs
        print(f"arguments ok: {cls.__name__} {' '.join(sys.argv[1:] if argv is None else argv)}", flush=True)
        raise SystemExit(0)
    return cfg, preset


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
