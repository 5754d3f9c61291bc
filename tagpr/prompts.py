"""Prompts: the LaMP input with the user's profile, plus the tagged-reasoning instruction.

A TagPR prompt is one user turn: the official LaMP augmentation of the input with the
retrieved profile items (`lamp.augment`), then an instruction to reason in tagged steps
inside `<think>` and answer after `</think>`. The chat template is applied by the
caller (`chat`), with the tokenizer of the model being trained.

The SFT / RL record schema shared by `build_data.py` and the trainers lives here too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from . import lamp, retrieval
from .tags import DEFAULT_TAGS

ANSWER_FORMAT = {
    "classification": "Then write only the answer, exactly as the question asks for it.",
    "rating": "Then write only the score, a single number from 1 to 5.",
    "generation": "Then write only the requested text, nothing before or after it.",
}


def tagged_instruction(task: lamp.Task, vocab: Sequence[str] = DEFAULT_TAGS, min_tags: int = 3) -> str:
    tags = ", ".join(f"<{t}>" for t in vocab)
    return (f"First think about what this user's history shows, inside <think> ... </think>, as at least {min_tags} "
            f"steps, each wrapped in one of these tags: {tags}. {ANSWER_FORMAT[task.kind]}")


def tagpr_prompt(task: lamp.Task | str, question: lamp.Question, items: Sequence[lamp.Item],
                 vocab: Sequence[str] = DEFAULT_TAGS, min_tags: int = 3) -> str:
    """The user turn for TagPR: profile-augmented LaMP input + tagged-reasoning instruction."""
    task = lamp.get_task(task) if isinstance(task, str) else task
    return f"{lamp.augment(task, question.input, items)}\n\n{tagged_instruction(task, vocab, min_tags)}"


def build_prompt(task: lamp.Task | str, question: lamp.Question, k: int = 8, retriever: str = "recency",
                 seed: int = 0, vocab: Sequence[str] = DEFAULT_TAGS, min_tags: int = 3) -> str:
    task = lamp.get_task(task) if isinstance(task, str) else task
    return tagpr_prompt(task, question, retrieval.retrieve(task, question, k, retriever, seed), vocab, min_tags)


def chat(tokenizer, prompt: str) -> str:
    """The prompt as the model's chat template renders a user turn, ready for the assistant's reply."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


# ----------------------------------------------------------------------------- shared record schemas

@dataclass
class SFTRecord:
    """One line of `sft.jsonl`.

    id: the LaMP question id; task: e.g. "LaMP_2"; user_id: the profile's owner;
    prompt: the user turn (profile-augmented input + instruction, chat template not
    applied); chain: the tagged reasoning, `<think> … </think>`; answer: the final answer.
    The training target is `chain + "\\n" + answer` followed by EOS.
    """
    id: str
    task: str
    user_id: str
    prompt: str
    chain: str
    answer: str

    FIELDS = ("id", "task", "user_id", "prompt", "chain", "answer")

    @property
    def target(self) -> str:
        return f"{self.chain.strip()}\n{self.answer.strip()}"

    def to_json(self) -> dict:
        return {f: getattr(self, f) for f in self.FIELDS}


def parse_sft_record(obj: dict, path, lineno: int) -> SFTRecord:
    from .files import DataError

    for f in SFTRecord.FIELDS:
        if f not in obj:
            raise DataError(f"{path}:{lineno}: missing field '{f}' (an sft.jsonl line needs {', '.join(SFTRecord.FIELDS)})")
        if not isinstance(obj[f], str):
            raise DataError(f"{path}:{lineno}: field '{f}' must be a string, got {type(obj[f]).__name__}")
    if not obj["prompt"].strip() or not obj["answer"].strip():
        raise DataError(f"{path}:{lineno}: field '{'prompt' if not obj['prompt'].strip() else 'answer'}' is empty")
    lamp.get_task(obj["task"])
    return SFTRecord(*(obj[f] for f in SFTRecord.FIELDS))


def read_sft(path) -> list[SFTRecord]:
    from .files import DataError, iter_jsonl

    records = []
    for lineno, obj in iter_jsonl(path):
        r = parse_sft_record(obj, path, lineno)
        records.append(r)
    if not records:
        raise DataError(f"{path}: no records")
    return records


@dataclass
class RLPrompt:
    """One line of `rl_prompts.jsonl` (shared with build_data.py): id, task, user_id,
    prompt (the user turn: query + profile + tagged-reasoning instruction), gold."""
    id: str
    task: str
    user_id: str
    prompt: str
    gold: str

    FIELDS = ("id", "task", "user_id", "prompt", "gold")

    def to_json(self) -> dict:
        return {f: getattr(self, f) for f in self.FIELDS}


def read_rl_prompts(path) -> list[RLPrompt]:
    from .files import DataError, iter_jsonl

    out = []
    for lineno, obj in iter_jsonl(path):
        for f in RLPrompt.FIELDS:
            if not isinstance(obj.get(f), str):
                raise DataError(f"{path}:{lineno}: field '{f}' missing or not a string")
        lamp.get_task(obj["task"])
        out.append(RLPrompt(*(obj[f] for f in RLPrompt.FIELDS)))
    if not out:
        raise DataError(f"{path}: no prompts")
    return out
