"""Training records written from synthetic users' latent rules: tagged expert chains, SFT records and PRMU's
preference pairs (PRP: with the profile ≻ without it; PQP: the right rule ≻ another rule's wrong answer).
"""

from __future__ import annotations

import zlib
from collections import Counter
from pathlib import Path

from .. import lamp
from ..prompts import tagpr_prompt
from ..records import Pair, SFTRecord
from ..retrieval import retrieve
from ..tags import render
from .rules import SYNTHETIC_TASKS, latent_generator
from .users import read_latent, restore_content


def expert_chain(task: str, items: list[lamp.Item], latent: dict) -> tuple[list[tuple[str, str]], str]:
    """A correct tagged reasoning chain written from the question's latent rule.

    Steps: analyze_input (what the input contains), examine_examples (the user's own
    outputs among the shown profile items), identify_patterns (the rule),
    make_decision (the rule applied). Returns (steps, answer).
    """
    t = lamp.get_task(task)
    gen = latent_generator(t.name, latent)
    c = restore_content(latent["content"])
    field = t.answer_field or "title"
    shown = "; ".join(f'"{it[field]}"' for it in items[:4]) or "none"
    answer = gen.answer(latent["rule"], c)
    steps = [
        ("analyze_input", f"The input: {gen.summary(c)}."),
        ("examine_examples", f"The user's own past outputs: {shown}."),
        ("identify_patterns", latent["explanation"]),
        ("make_decision", f"Applying that to this input gives: {answer}"),
    ]
    return steps, answer


def sft_records(
    lamp_dir: str | Path, tasks=SYNTHETIC_TASKS, split: str = "train", k: int = 8, retriever: str = "recency"
) -> list:
    """`sft.jsonl` records from synthetic users' latent rules (until build_data.py writes real ones)."""

    out = []
    for task in tasks:
        s = lamp.load_split(lamp_dir, task, split)
        latent = read_latent(lamp_dir, task, split)
        for q in s.questions:
            items = retrieve(s.task, q, k, retriever)
            steps, answer = expert_chain(s.task.name, items, latent[q.id])
            chain = render(steps, "").strip()
            out.append(SFTRecord(q.id, s.task.name, q.user_id or q.id, tagpr_prompt(s.task, q, items), chain, answer))
    return out


def preference_pairs(
    lamp_dir: str | Path, tasks=SYNTHETIC_TASKS, split: str = "train", k: int = 8, retriever: str = "recency"
) -> list:
    """PRMU pairs from synthetic users (until build_data.py writes real ones).

    PRP: the expert chain (made with the profile) ≻ a chain made without it (the answer
    most users would give). PQP: the correct chain ≻ the same chain under another rule
    whose answer differs (a wrong answer with a plausible rationale).
    """

    out = []
    for task in tasks:
        s = lamp.load_split(lamp_dir, task, split)
        latent = read_latent(lamp_dir, task, split)
        for q in s.questions:
            items = retrieve(s.task, q, k, retriever)
            lat = latent[q.id]
            gen = latent_generator(s.task.name, lat)
            c = restore_content(lat["content"])
            steps, answer = expert_chain(s.task.name, items, lat)
            good = render(steps, answer)
            prompt = tagpr_prompt(s.task, q, items)
            answers = [gen.answer(r, c) for r in gen.rules]
            floor = Counter(answers).most_common(1)[0][0] if not s.task.is_generation else answers[0]
            blind = render(
                [
                    ("analyze_input", f"The input: {gen.summary(c)}."),
                    ("make_decision", f"Without looking at this user's history, the usual answer: {floor}"),
                ],
                floor,
            )
            out.append(Pair(f"{q.id}-prp", "prp", q.user_id or q.id, s.task.name, prompt, good, blind))
            wrong = [r for r in gen.rules if gen.answer(r, c) != answer]
            if wrong:
                r = wrong[zlib_index(q.id, len(wrong))]
                bad_steps, bad = expert_chain(s.task.name, items, {**lat, "rule": r, "explanation": gen.rules[r]})
                out.append(
                    Pair(f"{q.id}-pqp", "pqp", q.user_id or q.id, s.task.name, prompt, good, render(bad_steps, bad))
                )
    return out


def zlib_index(key: str, n: int) -> int:
    return zlib.crc32(key.encode()) % n
