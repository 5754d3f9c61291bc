"""Prompts: the LaMP input with the user's profile, plus the tagged-reasoning instruction.

A TagPR prompt is one user turn: the official LaMP augmentation of the input with the
retrieved profile items (`lamp.augment`), then an instruction to reason in tagged steps
inside `<think>` and answer after `</think>`. The chat template is applied by the
caller (`chat`), with the tokenizer of the model being trained.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import lamp, retrieval
from .tags import DEFAULT_TAGS

ANSWER_FORMAT = {
    "classification": "Then write only the answer, exactly as the question asks for it.",
    "rating": "Then write only the score, a single number from 1 to 5.",
    "generation": "Then write only the requested text, nothing before or after it.",
}


def tagged_instruction(task: lamp.Task, vocab: Sequence[str] = DEFAULT_TAGS, min_tags: int = 3) -> str:
    tags = ", ".join(f"<{t}>" for t in vocab)
    return (
        f"First think about what this user's history shows, inside <think> ... </think>, as at least {min_tags} "
        f"steps, each wrapped in one of these tags: {tags}. {ANSWER_FORMAT[task.kind]}"
    )


def tagpr_prompt(
    task: lamp.Task | str,
    question: lamp.Question,
    items: Sequence[lamp.Item],
    vocab: Sequence[str] = DEFAULT_TAGS,
    min_tags: int = 3,
) -> str:
    """The user turn for TagPR: profile-augmented LaMP input + tagged-reasoning instruction."""
    task = lamp.get_task(task) if isinstance(task, str) else task
    return f"{lamp.augment(task, question.input, items)}\n\n{tagged_instruction(task, vocab, min_tags)}"


def build_prompt(
    task: lamp.Task | str,
    question: lamp.Question,
    k: int = 8,
    retriever: str = "recency",
    seed: int = 0,
    vocab: Sequence[str] = DEFAULT_TAGS,
    min_tags: int = 3,
) -> str:
    task = lamp.get_task(task) if isinstance(task, str) else task
    return tagpr_prompt(task, question, retrieval.retrieve(task, question, k, retriever, seed), vocab, min_tags)


# the fixed words each task's input starts with (LaMP-1 apart: its items sit inside its input)
INPUT_STARTS = tuple(t.template.split("{")[0] for t in lamp.TASKS.values() if t.wrap != "@after_title")
LAMP1_START = lamp.TASKS["LaMP_1"].template.split("{")[0]


def without_profile(prompt: str) -> str:
    """A TagPR prompt with its profile items taken out: what `tagpr_prompt` gives with no items (the input and the
    instruction). The official augmentation puts the items before the input, and each task's input starts with
    the fixed words of its template, so the input starts at their last occurrence. LaMP-1, whose items sit inside
    the input, and a prompt no task's template starts are refused."""
    at = max(prompt.rfind(s) for s in INPUT_STARTS)
    if prompt.startswith(LAMP1_START) or at < 0:
        raise ValueError(
            f"prompt {prompt[:60]!r}…: not a TagPR prompt whose profile precedes its input (LaMP-2 to LaMP-7), "
            "so its profile cannot be taken out"
        )
    return prompt[at:]


def chat(tokenizer, prompt: str) -> str:
    """The prompt as the model's chat template renders a user turn, ready for the assistant's reply."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
