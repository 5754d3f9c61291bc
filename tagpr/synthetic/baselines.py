"""Reference predictors on synthetic users and their table: the no-profile floor (the answer most users give to
an input), profile-identified (the first rule consistent with the k most recent profile items) and the oracle
ceiling (the true rule), each scored with the official metrics.
"""

from __future__ import annotations

import random
import statistics
from collections import Counter

from .. import lamp
from ..metrics import evaluate
from .rules import LaMP1, generator
from .users import Example


def _most_recent(example: Example, k: int) -> list[dict]:
    """Contents of the k most recent profile items (the default recency retrieval)."""
    ranked = sorted(range(len(example.question.profile)), key=lambda i: example.question.profile[i].date, reverse=True)
    return [(example.question.profile[i], example.profile_contents[i]) for i in ranked[:k]]


def _answer_field(task: str) -> str:
    return lamp.TASKS[task].answer_field or "title"


def predict(task: str, example: Example, mode: str, k: int = 8, style: str | None = None) -> str:
    """One of the reference predictors: 'floor', 'profile' or 'oracle'."""
    gen = generator(task, example.difficulty)
    rules = list(gen.rules)
    c = example.content
    if mode == "oracle":
        return gen.answer(example.rule, c)
    if mode == "profile":
        # the first rule under which every retrieved item's recorded answer is what the rule gives
        seen = _most_recent(example, k)
        for r in rules:
            if task == "LaMP_1":  # a LaMP-1 profile item is a paper: consistent if it is in the rule's field
                ok = all(any(f" {w} " in f" {it['title']} " for w in LaMP1.FIELDS[r]) for it, _ in seen)
            else:
                ok = all(
                    gen.item(r, pc, random.Random(0))[_answer_field(task)] == it[_answer_field(task)] for it, pc in seen
                )
            if ok:
                return gen.answer(r, c)
        return gen.answer(rules[0], c)
    if mode == "floor":
        return floor_answer(task, c, example.difficulty, style)
    raise ValueError(f"unknown predictor {mode!r}")


def floor_answer(task: str, content: dict, difficulty: str = "hard", style: str | None = None) -> str:
    """The no-profile floor's answer to an input: the answer most rules give (ties: the first rule's), the median
    rating for LaMP-3, and for generation one style (`style`, else the first rule's) for everyone."""
    gen = generator(task, difficulty)
    rules = list(gen.rules)
    if lamp.TASKS[task].is_generation:
        return gen.answer(style or rules[0], content)
    answers = [gen.answer(r, content) for r in rules]
    if task == "LaMP_3":
        return str(int(statistics.median(int(a) for a in answers)))
    return Counter(answers).most_common(1)[0][0]  # ties: the first seen, i.e. the first rule's answer


def measure(examples_by_task: dict[str, list[Example]], k: int = 8) -> dict[str, dict[str, dict]]:
    """Official metrics of the floor / profile-identified / oracle predictors per task."""

    out = {}
    for task, examples in examples_by_task.items():
        golds = {e.question.id: e.gold for e in examples}
        rows = {}
        if lamp.TASKS[task].is_generation:  # the floor is the single best style for everyone
            best = None
            for style in generator(task, examples[0].difficulty).rules:
                m = evaluate(task, golds, {e.question.id: predict(task, e, "floor", style=style) for e in examples})
                if best is None or m["rouge-1"] > best[1]["rouge-1"]:
                    best = (style, m)
            rows["floor"] = {**best[1], "style": best[0]}
        else:
            rows["floor"] = evaluate(task, golds, {e.question.id: predict(task, e, "floor") for e in examples})
        rows["profile"] = evaluate(task, golds, {e.question.id: predict(task, e, "profile", k) for e in examples})
        rows["oracle"] = evaluate(task, golds, {e.question.id: predict(task, e, "oracle") for e in examples})
        out[task] = rows
    return out


def report_table(results: dict[str, dict[str, dict]]) -> str:
    lines = [
        "| task | metric | no-profile floor | profile-identified (k=8) | oracle ceiling |",
        "|---|---|---|---|---|",
    ]
    for task, rows in results.items():
        for key in [k for k in rows["oracle"] if isinstance(rows["oracle"][k], float)]:
            lines.append(
                f"| {task} | {key} | {rows['floor'][key]:.3f} | {rows['profile'][key]:.3f} | "
                f"{rows['oracle'][key]:.3f} |"
            )
    return "\n".join(lines)
