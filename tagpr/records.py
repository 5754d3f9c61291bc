"""The pipeline's own record types and their readers: `build_data.py` writes them, the trainers read them.

    sft.jsonl         SFTRecord   id, task, user_id, prompt, chain, answer
    rl_prompts.jsonl  RLPrompt    id, task, user_id, prompt, gold
    prp.jsonl         Pair        id, set ("prp"), user_id, task, prompt, chosen, rejected
    pqp.jsonl         Pair        id, set ("pqp"), …

Every record is checked before any work: each field present and a string, the task known, and an answer
(SFT's `answer`, RL's `gold`) one the task can have — a label of the task's label set, a rating from 1
to 5 (`lamp.answer_problem`). An error names the file, the line and the field. No torch here: data
modules import this without importing the models.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from . import lamp
from .files import DataError, iter_jsonl


@dataclass
class SFTRecord:
    """One line of `sft.jsonl`.

    id: the LaMP question id (with a chain suffix); task: e.g. "LaMP_2"; user_id: the profile's owner;
    prompt: the user turn (profile-augmented input + instruction, chat template not applied);
    chain: the tagged reasoning, `<think> … </think>`; answer: the final answer.
    The training target is `chain + "\\n" + answer` followed by EOS.
    """

    id: str
    task: str
    user_id: str
    prompt: str
    chain: str
    answer: str

    FIELDS = ("id", "task", "user_id", "prompt", "chain", "answer")
    ANSWER = "answer"  # the field that must be an answer the task can have

    @property
    def target(self) -> str:
        return f"{self.chain.strip()}\n{self.answer.strip()}"

    def to_json(self) -> dict:
        return {f: getattr(self, f) for f in self.FIELDS}


@dataclass
class RLPrompt:
    """One line of `rl_prompts.jsonl`: id, task, user_id, prompt (the user turn: query + profile +
    tagged-reasoning instruction), gold."""

    id: str
    task: str
    user_id: str
    prompt: str
    gold: str

    FIELDS = ("id", "task", "user_id", "prompt", "gold")
    ANSWER = "gold"

    def to_json(self) -> dict:
        return {f: getattr(self, f) for f in self.FIELDS}


@dataclass
class Pair:
    """One line of `prp.jsonl` / `pqp.jsonl`.

    id: pair id; set: "prp" (made with the profile ≻ made without) or "pqp" (correct or higher ROUGE ≻
    worse); user_id (empty or null: the unknown user); task; prompt (query + profile, the user turn);
    chosen / rejected: the two responses (reasoning chain + answer).
    """

    id: str
    set: str
    user_id: str
    task: str
    prompt: str
    chosen: str
    rejected: str

    FIELDS = ("id", "set", "user_id", "task", "prompt", "chosen", "rejected")
    ANSWER = None

    def to_json(self) -> dict:
        return {f: getattr(self, f) for f in self.FIELDS}


R = TypeVar("R", SFTRecord, RLPrompt, Pair)


def _read(
    path: str | os.PathLike,
    cls: type[R],
    check: Callable[[dict, str], None] | None = None,
    nullable: tuple[str, ...] = (),
) -> list[R]:
    """Every line of `path` as a `cls`: fields present and strings (`nullable` ones may be null → ""), ids
    unique, the task known, the answer field valid for the task, then `check(obj, where)`."""
    out = []
    seen: dict[str, int] = {}  # id → the line that has it
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        for f in cls.FIELDS:
            if f not in obj:
                raise DataError(f"{where}: missing field '{f}' (a {cls.__name__} needs {', '.join(cls.FIELDS)})")
            if not isinstance(obj[f], str) and not (obj[f] is None and f in nullable):
                raise DataError(f"{where}: field '{f}' must be a string, got {type(obj[f]).__name__}")
        if obj["id"] in seen:
            raise DataError(f"{where}: field 'id': {obj['id']!r} repeats line {seen[obj['id']]} (ids must be unique)")
        seen[obj["id"]] = lineno
        try:
            task = lamp.get_task(obj["task"])
        except DataError as e:
            raise DataError(f"{where}: field 'task': {e}") from None
        if cls.ANSWER:
            problem = lamp.answer_problem(task, obj[cls.ANSWER])
            if problem:
                raise DataError(f"{where}: field '{cls.ANSWER}': {problem}")
        if check:
            check(obj, where)
        out.append(cls(*(obj[f] if obj[f] is not None else "" for f in cls.FIELDS)))
    if not out:
        raise DataError(f"{path}: no records")
    return out


def _prompt_check(obj: dict, where: str) -> None:
    if not obj["prompt"].strip():
        raise DataError(f"{where}: field 'prompt' is empty")


def _pair_check(obj: dict, where: str) -> None:
    if obj["set"] not in ("prp", "pqp"):
        raise DataError(f"{where}: field 'set' must be 'prp' or 'pqp', got {obj['set']!r}")


def read_sft(path: str | os.PathLike) -> list[SFTRecord]:
    return _read(path, SFTRecord, _prompt_check)


def read_rl_prompts(path: str | os.PathLike) -> list[RLPrompt]:
    return _read(path, RLPrompt, _prompt_check)


def read_pairs(path: str | os.PathLike) -> list[Pair]:
    return _read(path, Pair, _pair_check, nullable=("user_id",))
