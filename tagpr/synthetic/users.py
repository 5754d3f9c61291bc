"""Synthetic users: each draws one latent rule, writes a profile under it, and asks questions whose gold it
decides. Written as official LaMP files plus `<split>_latent.json` (each question's rule, its explanation and the
input's hidden facts). Deterministic by (task, split, seed, difficulty).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

from .. import lamp
from ..files import read_json, write_json
from .rules import GENERATORS, SYNTHETIC_TASKS, generator


@dataclass
class Example:
    question: lamp.Question
    gold: str
    rule: str
    content: dict
    profile_contents: list[dict] = field(default_factory=list)  # aligned with question.profile
    difficulty: str = "hard"


def _content_for(gen, rule, rng):
    return gen.content_for(rule, rng) if hasattr(gen, "content_for") else gen.content(rng)


def generate_split(
    task: str,
    split: str,
    n_users: int,
    questions_per_user: int,
    seed: int,
    profile_size: tuple[int, int] = (8, 20),
    difficulty: str = "hard",
) -> list[Example]:
    """Users of one task and split; deterministic in (task, split, seed, difficulty)."""
    gen = generator(task, difficulty)
    rng = random.Random(
        f"tagpr-synthetic:{gen.task}:{split}:{seed}" + ("" if difficulty == "hard" else f":{difficulty}")
    )
    rules = list(gen.rules)
    examples = []
    for u in range(n_users):
        rule = rules[rng.randrange(len(rules))]
        uid = f"{gen.task}-{split}-u{u:05d}"
        n_items = rng.randint(*profile_size)
        day = date(2015, 1, 1) + timedelta(days=rng.randrange(365))
        contents, items = [], []
        for j in range(n_items):
            c = gen.profile_content(rule, j, n_items, rng) if hasattr(gen, "profile_content") else gen.content(rng)
            day += timedelta(days=rng.randint(1, 40))
            items.append(lamp.Item(f"{uid}-p{j}", gen.item(rule, c, rng), day.isoformat()))
            contents.append(c)
        # official files are not sorted by date; shuffle so recency retrieval has work to do
        order = list(range(n_items))
        rng.shuffle(order)
        items = [items[i] for i in order]
        contents = [contents[i] for i in order]
        for q in range(questions_per_user):
            c = _content_for(gen, rule, rng)
            question = lamp.Question(f"{split}-{gen.task[5:]}-{u:05d}-{q}", gen.input(c), items, uid)
            examples.append(Example(question, gen.answer(rule, c), rule, c, contents, difficulty))
    return examples


def write_split(out: str | Path, task: str, split: str, examples: list[Example]) -> Path:
    t = lamp.get_task(task)
    d = Path(out) / t.name / split
    lamp.write_questions(d / f"{split}_questions.json", [e.question for e in examples])
    lamp.write_outputs(d / f"{split}_outputs.json", t, {e.question.id: e.gold for e in examples})
    write_json(
        d / f"{split}_latent.json",
        [
            {
                "id": e.question.id,
                "user_id": e.question.user_id,
                "rule": e.rule,
                "explanation": generator(t.name, e.difficulty).rules[e.rule],
                "content": e.content,
                **({"difficulty": e.difficulty} if e.difficulty != "hard" else {}),
            }
            for e in examples
        ],
    )
    return d


def read_latent(lamp_dir: str | Path, task: str, split: str) -> dict[str, dict]:
    """{question id: {"user_id", "rule", "explanation", "content"}} of a synthetic split."""

    qpath, _ = lamp.split_files(lamp_dir, task, split)
    return {r["id"]: r for r in read_json(qpath.parent / f"{split}_latent.json")}


DEFAULT_SIZES = {"train": (200, 4), "dev": (60, 2), "test": (60, 2)}


def generate(
    out: str | Path, tasks=SYNTHETIC_TASKS, seed: int = 0, sizes: dict | None = None, difficulty: str = "hard"
) -> dict[str, dict[str, list[Example]]]:
    """Write every split of every task under `out`; returns the examples for measurement."""
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    result: dict[str, dict[str, list[Example]]] = {}
    for task in tasks:
        name = lamp.get_task(task).name
        result[name] = {}
        for split, (users, per_user) in sizes.items():
            ex = generate_split(name, split, users, per_user, seed, difficulty=difficulty)
            write_split(out, name, split, ex)
            result[name][split] = ex
    return result


def restore_content(content: dict) -> dict:
    """JSON turned tuples into lists; the generators index them the same way."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in content.items()}


def vocabulary_text(seed: int = 1234, users: int = 12):
    """LaMP-style text from every generator (for the tiny model's tokenizer)."""
    for task in GENERATORS:
        for e in generate_split(task, "train", users, 1, seed):
            yield e.question.input
            yield e.gold
            for it in e.question.profile:
                yield " ".join(it.fields.values())
