"""One dataclass per script; every field becomes a CLI flag (`--lr 1e-6`); presets set sizes.

Precedence: dataclass defaults (the paper's values) < `--preset NAME` < explicit flags.
Booleans take `--flag` / `--no-flag`.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any


def parse(cls, presets: dict[str, dict[str, Any]], argv=None, description: str | None = None):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", choices=sorted(presets), default=None, help="named sizes; explicit flags win")
    for name, f in fields.items():
        flag = "--" + name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.type in (bool, "bool"):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"(default {default})")
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            ap.add_argument(flag, type=typ, default=None, help=f"(default {default!r})")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    values = dict(presets.get(args.preset, {})) if args.preset else {}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"preset {args.preset!r} sets unknown fields {sorted(unknown)}")
    values.update({k: v for k, v in vars(args).items() if k in fields and v is not None})
    cfg = cls(**values)
    return cfg, args.preset


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
