"""The rewards of TagPR's RL stages (arXiv 2509.23140, §3.4, Eqs. 5–9 and 11).

Every function takes model outputs (strings) and returns one float per output;
none raises on garbage and none returns NaN.

    R       = R_v + λ1·R_f + R_rep + R_tag + λ2·R_p      (Eq. 5, guided stage)
    R_found = R_v + R_f + R_rep                          (Eq. 11, exploratory stage)

Departures and choices (the paper's text lost the λ values and the exact penalty sizes):
1. λ1 (`w_format`) = 0.5 and λ2 (`w_personal`) = 0.5 by default: format and the learned
   PRMU signal each weigh half of correctness. All five weights are configurable.
2. R_v for LaMP-3 is `max(0, 1 − |ŷ − y| / 4)`: the floor at 0 keeps an out-of-range
   number (e.g. 9) from scoring below an unparsable answer (0).
3. R_rep is 0 for a text with fewer than n tokens (no n-grams, nothing repeated).
4. R_tag subtracts 0.5 for a broken format, 0.25 for any tag outside the vocabulary and
   0.25 for fewer than `min_tags` steps (so it lies in [−1, 0]).
5. The answer is the text after `</think>`; an output with no think block at all is
   its own answer (baselines that answer directly), and an unclosed `<think>` has none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from . import lamp, tags
from .metrics import label_index, rouge_pairs

TAG_PENALTIES = {"format": 0.5, "vocab": 0.25, "count": 0.25}


def extract_answer(text) -> str:
    """The final answer of an output: after `</think>`; the whole text if there is no think block."""
    if not isinstance(text, str):
        return ""
    if tags.THINK_CLOSE in text:
        return text.split(tags.THINK_CLOSE, 1)[1].strip()
    if tags.THINK_OPEN in text:
        return ""  # truncated inside the reasoning
    return text.strip()


def _tasks(tasks, n: int) -> list[lamp.Task]:
    if isinstance(tasks, (str, lamp.Task)):
        tasks = [tasks] * n
    if len(tasks) != n:
        raise ValueError(f"{len(tasks)} tasks for {n} outputs")
    return [lamp.get_task(t) if isinstance(t, str) else t for t in tasks]


def verifiable_reward(outputs: Sequence[str], golds: Sequence[str], tasks) -> list[float]:
    """R_v (Eq. 6): correctness of the answer against the gold.

    LaMP-1/2: 1 if the answer is exactly the gold label after stripping, else 0.
    LaMP-3: max(0, 1 − |ŷ − y| / 4), 0 when unparsable. Generation: (ROUGE-1 F + ROUGE-L F) / 2.
    """
    tasks = _tasks(tasks, len(outputs))
    answers = [extract_answer(o) for o in outputs]
    out = [0.0] * len(outputs)
    gen = [i for i, t in enumerate(tasks) if t.is_generation]
    if gen:
        r1, rl = rouge_pairs([golds[i] for i in gen], [answers[i] for i in gen])
        for i, a, b in zip(gen, r1, rl):
            out[i] = (a + b) / 2
    for i, t in enumerate(tasks):
        if t.kind == "classification":
            g = label_index(t.labels, golds[i])
            out[i] = float(g >= 0 and label_index(t.labels, answers[i]) == g)
        elif t.kind == "rating":
            try:
                y_hat = float(answers[i])
            except ValueError:
                continue
            if math.isfinite(y_hat):
                out[i] = max(0.0, 1.0 - abs(y_hat - float(golds[i])) / 4.0)
    return out


def parse_all(outputs: Sequence[str], parsed: Sequence[tags.Parsed] | None = None) -> list[tags.Parsed]:
    """`tags.parse` of every output, or `parsed` when the caller parsed them already (once per GSPO step)."""
    if parsed is None:
        return [tags.parse(o) for o in outputs]
    if len(parsed) != len(outputs):
        raise ValueError(f"{len(parsed)} parsed outputs for {len(outputs)} outputs")
    return list(parsed)


def format_reward(outputs: Sequence[str], parsed: Sequence[tags.Parsed] | None = None) -> list[float]:
    """R_f (Eq. 7): 1 if `<think>` holds well-formed tagged steps and a non-empty answer follows, else 0."""
    return [float(p.well_formed and len(p.steps) > 0 and p.answer != "") for p in parse_all(outputs, parsed)]


def repetition_reward(outputs: Sequence[str], n: int = 4, eps: float = 1e-6) -> list[float]:
    """R_rep (Eq. 8): |set of n-grams| / (|multiset of n-grams| + ε) − 1 over whitespace tokens,
    written (|set| − |multiset|) / (|multiset| + ε): the same up to ε / (|multiset| + ε), and exactly 0
    without repetition, as the paper states — the literal form gives −ε/(m + ε), which differs from one
    rollout to the next with the length and, once a group's other rewards tie, becomes a spurious
    advantage after the (std + ε) normalisation.
    → −1 for a loop; 0 for a text with fewer than n tokens.
    """
    out = []
    for o in outputs:
        toks = o.split() if isinstance(o, str) else []
        grams = [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
        out.append(0.0 if not grams else (len(set(grams)) - len(grams)) / (len(grams) + eps))
    return out


def tag_reward(
    outputs: Sequence[str], vocab=tags.DEFAULT_TAGS, min_tags: int = 3, parsed: Sequence[tags.Parsed] | None = None
) -> list[float]:
    """R_tag (Eq. 9): 0 when every check passes; minus a penalty per failed check
    (format 0.5, tag outside the vocabulary 0.25, fewer than `min_tags` steps 0.25)."""
    return [
        -sum(TAG_PENALTIES[k] for k, ok in tags.check(p, vocab, min_tags).items() if not ok)
        for p in parse_all(outputs, parsed)
    ]


@dataclass(frozen=True)
class RewardWeights:
    """Weights of Eq. 5; `w_format` is λ1 and `w_personal` λ2 (values ours, see module docstring)."""

    w_verifiable: float = 1.0
    w_format: float = 0.5
    w_repetition: float = 1.0
    w_tag: float = 1.0
    w_personal: float = 0.5


def _finite(xs: Sequence[float]) -> list[float]:
    return [float(x) if x is not None and math.isfinite(float(x)) else 0.0 for x in xs]


def composite_reward(
    outputs: Sequence[str],
    golds: Sequence[str],
    tasks,
    personal: Sequence[float] | None = None,
    weights: RewardWeights = RewardWeights(),
    vocab=tags.DEFAULT_TAGS,
    min_tags: int = 3,
    ngram: int = 4,
    parsed: Sequence[tags.Parsed] | None = None,
) -> tuple[list[float], dict[str, list[float]]]:
    """R (Eq. 5) = w_v·R_v + w_f·R_f + w_rep·R_rep + w_tag·R_tag + w_p·R_p.

    `personal` holds PRMU's σ(logit) per output (Eq. 3), computed by the caller so this
    stays pure; non-finite values count as 0. `parsed`: the outputs' `tags.parse`, if the
    caller has it (each output is parsed once either way). Returns (totals, {component: values}).
    """
    n = len(outputs)
    parsed = parse_all(outputs, parsed)
    parts = {
        "verifiable": verifiable_reward(outputs, golds, tasks),
        "format": format_reward(outputs, parsed),
        "repetition": repetition_reward(outputs, ngram),
        "tag": tag_reward(outputs, vocab, min_tags, parsed) if weights.w_tag else [0.0] * n,
        "personal": _finite(personal) if personal is not None else [0.0] * n,
    }
    if personal is not None and len(parts["personal"]) != n:
        raise ValueError(f"{len(parts['personal'])} personalization scores for {n} outputs")
    w = {
        "verifiable": weights.w_verifiable,
        "format": weights.w_format,
        "repetition": weights.w_repetition,
        "tag": weights.w_tag,
        "personal": weights.w_personal,
    }
    totals = [sum(w[k] * parts[k][i] for k in parts) for i in range(n)]
    return totals, parts


def foundation_reward(
    outputs: Sequence[str],
    golds: Sequence[str],
    tasks,
    ngram: int = 4,
    w_format: float = 0.5,
    parsed: Sequence[tags.Parsed] | None = None,
) -> tuple[list[float], dict[str, list[float]]]:
    """R_found (Eq. 11) = R_v + λ1·R_f + R_rep: the exploratory stage's reward. Eq. 11 is the guided reward
    without R_tag and R_p, so λ1 is the guided stage's (`w_format`, one value for both stages)."""
    weights = RewardWeights(w_verifiable=1.0, w_format=w_format, w_repetition=1.0, w_tag=0.0, w_personal=0.0)
    return composite_reward(outputs, golds, tasks, None, weights, ngram=ngram, parsed=parsed)
