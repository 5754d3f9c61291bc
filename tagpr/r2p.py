"""R2P, Reinforced Reasoning for Personalization (training-free; seeds 000/001 of REFERENCE §2).

Three parts, as the R2P paper describes them:
1. **Hierarchical reasoning template**: reason in three headed steps (analyse the request →
   synthesise the user's profile → plan the response) inside `<think>`, then the answer.
2. **Reasoning-process intervention**: generation runs in chunks of `chunk` tokens; after each
   chunk `intervention` inspects the text so far and, when it
   - leaves the template (no first heading after `drift_chars` characters, or a heading out of order),
   - runs too long (more than `budget_words` words of reasoning without closing `</think>`),
   - or ends with an answer in the wrong format (classification: not a label; rating: not 1–5),
   appends a corrective instruction to the model's own text and lets it continue.
3. **Self-referencing**: `candidates` responses are sampled, then the model reads all of them (their
   reasoning and answers, numbered) and writes one reconciled answer, referring to them.

Departures (the R2P paper's exact prompts and thresholds are not public):
1. The headings, the instruction texts and the thresholds (`chunk` 48 tokens, `drift_chars` 240,
   `budget_words` 180, at most `max_interventions` 3 per response) are ours.
2. A format intervention happens once the model has finished; it removes the invalid answer,
   states the allowed format and reopens the answer.
3. Continuing a partial reply over an OpenAI-compatible API: vLLM's `continue_final_message`, or
   llama.cpp's server, which continues a trailing assistant message and repeats it in its reply
   (`tagpr.llm.continuation` keeps the new text either way); local `hf:` models continue natively.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from . import lamp
from .llm import Backend, Request
from .rewards import extract_answer

HEADINGS = ("Step 1 - Request", "Step 2 - Profile", "Step 3 - Response")
TEMPLATE_FIX = "I should follow the three steps of the template."
TEMPLATE = (
    "Reason inside <think> ... </think> in exactly three steps, each starting with its heading:\n"
    f"{HEADINGS[0]}: what the question asks and the required answer format.\n"
    f"{HEADINGS[1]}: what the user's history above shows about their preferences and style.\n"
    f"{HEADINGS[2]}: how that applies to this input.\n"
    "Then, after </think>, write only the final answer, formatted exactly as the question asks."
)


@dataclass
class Settings:
    chunk: int = 48  # tokens generated between two checks
    drift_chars: int = 240  # reasoning length by which the first heading must have appeared
    budget_words: int = 180  # reasoning words before the model is told to conclude
    max_interventions: int = 3
    max_tokens: int = 384  # per response, all chunks together
    candidates: int = 3  # self-referencing: sampled responses to reconcile
    temperature: float = 0.7  # for the candidates; the reconciliation is greedy


DEFAULTS = Settings()


def format_ok(task: lamp.Task, answer: str) -> bool:
    a = answer.strip()
    if task.kind == "classification":
        return a in task.labels
    if task.kind == "rating":
        return a in ("1", "2", "3", "4", "5")
    return bool(a)


def format_rule(task: lamp.Task) -> str:
    if task.kind == "classification":
        return "exactly one of: " + ", ".join(task.labels)
    if task.kind == "rating":
        return "a single number: 1, 2, 3, 4 or 5"
    return "only the requested text"


def intervention(text: str, task: lamp.Task, finished: bool, s: Settings = DEFAULTS) -> tuple[str, str] | None:
    """(kind, the new text) when the response so far needs a correction, else None.

    `text` is the reply so far; `finished` says the model stopped by itself. The new text
    replaces `text` (a format correction removes the invalid answer; the others append).
    """
    if "</think>" in text:
        answer = extract_answer(text)
        if finished and not format_ok(task, answer):
            head = text.split("</think>", 1)[0].rstrip()
            return "format", (f"{head}\nThe final answer must be {format_rule(task)}, and nothing else.\n</think>\n")
        return None
    body = text.split("<think>", 1)[1] if "<think>" in text else text
    # headings are judged in the text since the last template correction, which restarts the order there
    seg = body.rsplit(TEMPLATE_FIX, 1)[-1]
    order = [i for _, i in sorted((seg.find(h), i) for i, h in enumerate(HEADINGS) if h in seg)]
    start = order[0] if order and TEMPLATE_FIX in body else 0
    if order != list(range(start, start + len(order))) or (not order and len(body) >= s.drift_chars):
        missing = [i for i in range(len(HEADINGS)) if i not in order]
        follow = HEADINGS[missing[0] if missing else -1]
        return "template", f"{text.rstrip()}\n{TEMPLATE_FIX}\n{follow}:"
    if len(body.split()) > s.budget_words:
        return "length", f"{text.rstrip()}\nI have reasoned enough; time to answer.\n</think>\n"
    if finished:  # stopped inside the reasoning: close it so that an answer follows
        return "unclosed", f"{text.rstrip()}\n</think>\n"
    return None


@dataclass
class Trace:
    text: str = ""
    interventions: list[str] = field(default_factory=list)
    done: bool = False


def generate_guided(
    backend: Backend,
    messages: Sequence[list[dict]],
    tasks: Sequence[lamp.Task],
    s: Settings = DEFAULTS,
    temperature: float = 0.0,
    sample: int | Sequence[int] = 0,
    progress: str | None = None,
) -> list[Trace]:
    """Chunked generation with intervention for a batch of conversations (the template already in the prompt).
    `sample`: the sample index of every conversation, or one per conversation (several samples of a prompt
    in one batch)."""
    samples = [sample] * len(messages) if isinstance(sample, int) else list(sample)
    traces = [Trace(text="<think>\n") for _ in messages]
    rounds = -(-s.max_tokens // s.chunk) + s.max_interventions
    for _ in range(rounds):
        live = [i for i, t in enumerate(traces) if not t.done]
        if not live:
            break
        reqs = [
            Request(messages[i], {"role": "r2p"}, temperature, s.chunk, samples[i], prefix=traces[i].text) for i in live
        ]
        for i, rep in zip(live, backend.chat(reqs, progress=progress)):
            t = traces[i]
            if rep.error:
                t.done = True
                t.interventions.append(f"error: {rep.error}")
                continue
            t.text += rep.text
            fix = (
                intervention(t.text, tasks[i], rep.finished, s) if len(t.interventions) < s.max_interventions else None
            )
            if fix:
                t.interventions.append(fix[0])
                t.text = fix[1]
            elif rep.finished or len(t.text) > 8 * s.max_tokens:
                t.done = True
    for t in traces:
        t.done = True
    return traces


def reconcile_prompt(prompt: str, candidates: Sequence[str]) -> str:
    """The self-referencing turn: the original request and every candidate, numbered."""
    shown = "\n\n".join(f"Candidate {j + 1}:\n{c.strip()}" for j, c in enumerate(candidates))
    return (
        f"{prompt}\n\nHere are {len(candidates)} candidate responses to this request:\n\n{shown}\n\n"
        "Refer to the candidates: in Step 3 say which of them agree with the user's history and why, then "
        "after </think> write the single best final answer."
    )


def r2p(backend: Backend, prompts: Sequence[str], tasks: Sequence[lamp.Task], s: Settings = DEFAULTS) -> list[dict]:
    """R2P for a batch: candidates with intervention, then a reconciled answer. One dict per prompt:
    answer, output (the reconciliation's text), candidates (texts), interventions (kinds, all rounds)."""
    user = [f"{p}\n\n{TEMPLATE}" for p in prompts]
    n, C = len(user), s.candidates
    # every candidate of every prompt in one batch (C × n conversations per round, not C rounds of n)
    flat = generate_guided(
        backend,
        [[{"role": "user", "content": u}] for _ in range(C) for u in user],
        list(tasks) * C,
        s,
        s.temperature,
        sample=[j for j in range(C) for _ in user],
        progress="r2p candidates",
    )
    cands = [flat[j * n : (j + 1) * n] for j in range(C)]
    final_user = [reconcile_prompt(u, [c[i].text for c in cands]) for i, u in enumerate(user)]
    final = generate_guided(
        backend, [[{"role": "user", "content": u}] for u in final_user], tasks, s, 0.0, progress="r2p reconcile"
    )
    return [
        {
            "answer": extract_answer(final[i].text),
            "output": final[i].text,
            "candidates": [c[i].text for c in cands],
            "interventions": [k for c in cands for k in c[i].interventions] + final[i].interventions,
        }
        for i in range(len(prompts))
    ]
