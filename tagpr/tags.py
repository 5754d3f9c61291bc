"""The tag vocabulary and the tagged-reasoning output format.

An output of the policy looks like

    <think>
    <analyze_input> what is asked </analyze_input>
    <examine_examples> what the profile shows </examine_examples>
    <make_decision> the choice and why </make_decision>
    </think>
    the answer

TagPR (arXiv 2509.23140, §3.2) derives 9 primary tags by clustering free tags; the
paper names five (analyze_input, examine_examples, identify_patterns,
compare_entities, make_decision; Fig. 5). The other four are not public: the four
below marked "ours" stand in for them. The vocabulary is data — `build_data.py`
writes the one it derives to `tags.json`, read back with `load_tags`.

`parse` never raises: garbage, empty, truncated and nested input come back as a
`Parsed` whose `errors` say what is wrong.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .files import DataError, read_json

PAPER_TAGS = ("analyze_input", "examine_examples", "identify_patterns", "compare_entities", "make_decision")
OUR_TAGS = ("summarize_profile", "infer_preference", "apply_pattern", "verify_answer")  # ours, not the paper's
DEFAULT_TAGS = PAPER_TAGS + OUR_TAGS

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_TAG = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9_\-]*)>")


@dataclass
class Step:
    tag: str
    text: str


@dataclass
class Parsed:
    steps: list[Step] = field(default_factory=list)
    answer: str = ""
    has_think: bool = False  # a <think> … </think> block was found and closed
    errors: list[str] = field(default_factory=list)  # structural problems, in order found

    @property
    def tags(self) -> list[str]:
        return [s.tag for s in self.steps]

    @property
    def well_formed(self) -> bool:
        return self.has_think and not self.errors


def parse(text) -> Parsed:
    """Split `<think> <tag>…</tag> … </think> answer` into steps and the final answer.

    The answer is the text after the first `</think>`. Inside the think block every
    `<tag>` must be closed by `</tag>` before the next opens (no nesting); a problem
    is recorded in `errors` and parsing goes on, so a reward can still be computed.
    """
    out = Parsed()
    if not isinstance(text, str):
        out.errors.append(f"output is {type(text).__name__}, not text")
        return out
    start = text.find(THINK_OPEN)
    end = text.find(THINK_CLOSE, start + len(THINK_OPEN) if start >= 0 else 0)
    if start < 0:
        out.errors.append("no <think> block")
        if end >= 0:
            out.answer = text[end + len(THINK_CLOSE) :].strip()
        return out
    if end < 0:
        out.errors.append("<think> is never closed (truncated?)")
        body = text[start + len(THINK_OPEN) :]
    else:
        out.has_think = True
        body = text[start + len(THINK_OPEN) : end]
        out.answer = text[end + len(THINK_CLOSE) :].strip()
        if text[:start].strip():
            out.errors.append("text before <think>")
    open_tag, open_at = None, 0
    for m in _TAG.finditer(body):
        closing, name = m.group(1) == "/", m.group(2)
        if name == "think":
            out.errors.append("nested <think>")
            continue
        if not closing:
            if open_tag is not None:
                out.errors.append(f"<{name}> opened inside <{open_tag}> (nesting)")
                continue
            open_tag, open_at = name, m.end()
        elif open_tag is None:
            out.errors.append(f"</{name}> closes nothing")
        elif name != open_tag:
            out.errors.append(f"</{name}> closes <{open_tag}>")
        else:
            out.steps.append(Step(name, body[open_at : m.start()].strip()))
            open_tag = None
    if open_tag is not None:
        out.errors.append(f"<{open_tag}> is never closed")
    return out


def check(parsed: Parsed, vocab, min_tags: int = 3) -> dict[str, bool]:
    """The three tag checks of R_tag (paper Eq. 9): format, vocabulary, count."""
    vocab = set(vocab)
    return {
        "format": parsed.well_formed,
        "vocab": bool(parsed.steps) and all(t in vocab for t in parsed.tags),
        "count": len(parsed.steps) >= min_tags,
    }


def render(steps: list[tuple[str, str]], answer: str) -> str:
    """The canonical text of a tagged chain: the inverse of `parse` for well-formed input."""
    body = "\n".join(f"<{t}> {s.strip()} </{t}>" for t, s in steps)
    return f"{THINK_OPEN}\n{body}\n{THINK_CLOSE}\n{answer.strip()}"


def load_tags(path: str | Path) -> tuple[str, ...]:
    """Read a vocabulary: `tags.json` as written by build_data (`{"tags": [{"name": …}, …]}`) or a list of names."""

    data = read_json(path)
    items = data.get("tags") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise DataError(f"{path}: expected a non-empty list of tags (or {{'tags': [...]}})")
    names = []
    for i, t in enumerate(items):
        name = t.get("name") if isinstance(t, dict) else t
        if not isinstance(name, str) or not _TAG.fullmatch(f"<{name}>"):
            raise DataError(f"{path}: tags[{i}]: field 'name' must be a tag name like 'analyze_input', got {name!r}")
        names.append(name)
    if len(set(names)) != len(names):
        raise DataError(f"{path}: duplicate tag names")
    return tuple(names)


def dumps_tags(names, counts=None) -> str:
    return json.dumps({"tags": [{"name": n, **({"count": counts[n]} if counts else {})} for n in names]}, indent=1)
