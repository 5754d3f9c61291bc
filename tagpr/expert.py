"""The simulated expert: an offline stand-in for the teacher, judge and tagger LLMs, for synthetic users only.

It answers the data pipeline's requests (`tagpr.datagen`) from each synthetic question's
latent rule, in the same text formats a real model is asked for, so every parser, filter
and the clustering do real, counted work. It refuses any question without a latent rule
(real LaMP data): there it knows nothing. Every choice is a deterministic function of the
request (its text and sample index), like a seeded model's: identical requests get identical
replies, so answering from the request cache and answering afresh agree.

Mistakes, at these rates (each drawn independently per request):

| role | mistake | rate | caught by |
|---|---|---|---|
| teacher | reasons from another user's rule → wrong answer / other style | 0.25 | accuracy filter |
| teacher | rambles: repeats a step three times | 0.10 | judge (consistency 4, conciseness 1) |
| teacher | forgets the `Answer:` line | 0.05 | teacher parser |
| judge | unparsable reply | 0.03 | judge parser |
| judge | harsh grader: logical consistency 2 | 0.08 | judge threshold |
| explore tagger | free tag names: a synonym of the step's kind (always: clustering undoes it) | 1.00 | clustering |
| explore tagger | leaves a tag unclosed | 0.04 | tag parser |
| restrict tagger | one step under a tag outside the nine | 0.05 | format filter (vocab) |
| restrict tagger | leaves a tag unclosed | 0.05 | format filter (format) |
| restrict tagger | merges the steps into two | 0.03 | format filter (count) |

The teacher's steps come in nine kinds (the paper's five tags and our four); which of the
optional kinds a chain uses is drawn per chain, so tag frequencies differ as in the paper.
Styles: "full" steps (a sentence each: ~160 tokens a tagged chain on easy LaMP-2) and
"terse" ones (a one-word opener and the step's content only; the optional kinds other than
identify_patterns at half their rate: the same tags, facts and answer in ~110 tokens), which
make every stage that reads or writes chains cheaper. "bound" chains are terse ones whose decision names
the input's key and the value the user gave it ("Decision: office chair → 1."), on easy LaMP-2 and LaMP-3
(the other tasks' chains are terse): the step that binds the input to the profile is written out.
The restricted tagger finds, for each step, the offered tag nearest to its kind's name
(by the lexical embedding), as a reader of the tag list would.
"""

from __future__ import annotations

import copy
import hashlib
import re
from pathlib import Path

from . import lamp, synthetic
from .files import DataError
from .llm import Backend, HashingEmbedder, Reply

RATES = {
    "teacher_wrong_rule": 0.25,
    "teacher_ramble": 0.10,
    "teacher_no_answer": 0.05,
    "judge_unparsable": 0.03,
    "judge_harsh": 0.08,
    "explore_unclosed": 0.04,
    "restrict_out_of_vocab": 0.05,
    "restrict_unclosed": 0.05,
    "restrict_merge": 0.03,
}

# step kind → (the phrase that opens the step, probability that a chain has it)
KINDS = {
    "analyze_input": ("Reading the question:", 1.0),
    "summarize_profile": ("Overview of the history:", 0.3),
    "examine_examples": ("Looking at the user's past items:", 1.0),
    "compare_entities": ("Comparing the options:", 0.25),
    "identify_patterns": ("The pattern across them:", 0.8),
    "infer_preference": ("What this user prefers:", 0.3),
    "apply_pattern": ("Applying it to this input:", 0.3),
    "make_decision": ("Decision:", 1.0),
    "verify_answer": ("Double-checking:", 0.25),
}
# step kind → the opener of a terse step (style "terse")
TERSE = {
    "analyze_input": "Input:",
    "summarize_profile": "History:",
    "examine_examples": "Past:",
    "compare_entities": "Options:",
    "identify_patterns": "Pattern:",
    "infer_preference": "Preference:",
    "apply_pattern": "Apply:",
    "make_decision": "Decision:",
    "verify_answer": "Check:",
}
# chain style → step kind → the phrase that opens such a step
OPENERS = {"full": {k: phrase for k, (phrase, _) in KINDS.items()}, "terse": TERSE, "bound": TERSE}
# what a free tagger calls each kind: variants that share a word or a stem with the kind's name
SYNONYMS = {
    "analyze_input": ("analyze_input", "input_analysis", "analyze_the_input", "analyse_input", "analyze_query_input"),
    "summarize_profile": ("summarize_profile", "profile_summary", "summarize_user_profile", "profile_overview"),
    "examine_examples": ("examine_examples", "examining_examples", "examine_past_examples", "example_examination"),
    "compare_entities": ("compare_entities", "entity_comparison", "compare_candidate_entities", "comparing_entities"),
    "identify_patterns": ("identify_patterns", "pattern_identification", "identify_pattern", "identifying_patterns"),
    "infer_preference": ("infer_preference", "preference_inference", "infer_user_preference", "inferring_preference"),
    "apply_pattern": ("apply_pattern", "applying_the_pattern", "pattern_application", "apply_learned_pattern"),
    "make_decision": ("make_decision", "decision_making", "making_decision", "final_decision"),
    "verify_answer": ("verify_answer", "answer_verification", "verifying_answer", "verify_final_answer"),
}


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _u(*key) -> float:
    """A deterministic uniform draw in [0, 1) from a key (blake2b: crc32 is affine, so keys that differ
    in a character or two give correlated draws)."""
    h = hashlib.blake2b("|".join(map(str, key)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


class SimulatedExpert(Backend):
    name = "simulated"

    def __init__(
        self, lamp_dir: str | Path, tasks=synthetic.SYNTHETIC_TASKS, split: str = "train", style: str = "full"
    ):
        super().__init__()
        if style not in OPENERS:
            raise ValueError(f"chain style {style!r}: expected one of {', '.join(OPENERS)}")
        self.style = style
        self.terse = style != "full"  # terse and bound chains: one-word openers, optional steps at half rate
        self.questions: dict[str, tuple[lamp.Task, lamp.Question, dict]] = {}
        for t in tasks:
            s = lamp.load_split(lamp_dir, t, split)
            if not (lamp.split_files(lamp_dir, t, split)[0].parent / f"{split}_latent.json").is_file():
                raise DataError(
                    f"{lamp_dir}: {t} {split} has no {split}_latent.json: the simulated expert answers "
                    "only for synthetic users; for LaMP pass --teacher/--judge/--tagger as "
                    "openai:MODEL@URL or hf:NAME"
                )
            latent = synthetic.read_latent(lamp_dir, t, split)
            for q in s.questions:
                if q.id in latent:
                    self.questions[q.id] = (s.task, q, latent[q.id])
        self._embed = HashingEmbedder()

    def for_role(self) -> SimulatedExpert:
        """A view with its own call counters (one per role in the manifest)."""
        view = copy.copy(self)
        view.requests = view.cache_hits = view.failures = 0
        return view

    def describe(self) -> str:
        return f"simulated expert ({self.style} chains; synthetic users only; mistake rates in tagpr/expert.py)"

    def _chat(self, requests):
        out = []
        for r in requests:
            self.requests += 1
            role = r.meta.get("role", "")
            if r.meta.get("id") not in self.questions:
                out.append(
                    Reply(
                        error=f"the simulated expert knows only synthetic users; no latent rule for "
                        f"question {r.meta.get('id')!r}"
                    )
                )
            else:
                fn = {
                    "teacher": self.teacher,
                    "teacher_blind": self.teacher_blind,
                    "judge": self.judge,
                    "explore": self.explore,
                    "restrict": self.restrict,
                    "restrict_rejected": self.restrict,
                }.get(role)
                out.append(
                    Reply(fn(r.meta, r.messages[-1]["content"]))
                    if fn
                    else Reply(error=f"the simulated expert has no role {role!r}")
                )
        return out

    def embed(self, texts):
        return self._embed.embed(texts)

    # ------------------------------------------------------------------ teacher

    def teacher(self, meta: dict, prompt: str) -> str:
        task, q, lat = self.questions[meta["id"]]
        gen = synthetic.latent_generator(task.name, lat)
        key = (_digest(prompt), meta.get("sample", 0))
        rule = lat["rule"]
        if _u("wrong", *key) < RATES["teacher_wrong_rule"]:
            others = [r for r in gen.rules if r != rule]
            rule = others[int(_u("which", *key) * len(others))]
        c = synthetic.restore_content(lat["content"])
        answer = gen.answer(rule, c)
        items = [it for it in q.profile if it.id in set(meta.get("items", []))]
        field = task.answer_field or "title"
        shown = "; ".join(f'"{it[field]}"' for it in items[:4]) or "none"
        if self.terse:
            key_word = getattr(gen, "key", None) if self.style == "bound" else None
            text = {
                "analyze_input": f"{gen.summary(c)}.",
                "summarize_profile": f"{len(items)} past items.",
                "examine_examples": f"{shown}.",
                "compare_entities": "each option is another user's habit.",
                "identify_patterns": gen.rules[rule],
                "infer_preference": f"the '{rule}' way.",
                "apply_pattern": f"gives {answer}.",
                "make_decision": f"{key_word(c)} → {answer}." if key_word else f"{answer}.",
                "verify_answer": "the form fits.",
            }
        else:
            text = {
                "analyze_input": f"the input is {gen.summary(c)}.",
                "summarize_profile": f"{len(items)} of the user's past items are shown.",
                "examine_examples": f"their own outputs were {shown}.",
                "compare_entities": f"each candidate answer would follow a different user's habit; {gen.summary(c)}.",
                "identify_patterns": gen.rules[rule],
                "infer_preference": f"so this user prefers the '{rule}' way.",
                "apply_pattern": f"the '{rule}' habit applied here gives {answer}.",
                "make_decision": f"the answer is {answer}.",
                "verify_answer": "the answer has the form the question asks for.",
            }
        opener = OPENERS[self.style]
        # a terse chain: the optional kinds but identify_patterns (0.8) at half rate
        rate = {k: p / 2 if self.terse and p < 0.8 else p for k, (_, p) in KINDS.items()}
        steps = [f"{opener[k]} {text[k]}" for k, p in rate.items() if p >= 1.0 or _u(k, *key) < p]
        if _u("ramble", *key) < RATES["teacher_ramble"]:
            steps[1:2] = [steps[1]] * 3
        lines = [f"{i + 1}. {s}" for i, s in enumerate(steps)]
        if _u("noanswer", *key) >= RATES["teacher_no_answer"]:
            lines.append(f"Answer: {answer}")
        return "\n".join(lines)

    def teacher_blind(self, meta: dict, prompt: str) -> str:
        """Without the profile: the answer most users would give (the mode over rules; median rating)."""
        task, q, lat = self.questions[meta["id"]]
        gen = synthetic.latent_generator(task.name, lat)
        c = synthetic.restore_content(lat["content"])
        floor = synthetic.floor_answer(task.name, c, lat.get("difficulty", "hard"))
        if self.terse:
            return (
                f"1. {TERSE['analyze_input']} {gen.summary(c)}.\n2. {TERSE['make_decision']} no profile: the "
                f"usual {floor}.\nAnswer: {floor}"
            )
        return (
            f"1. {KINDS['analyze_input'][0]} the input is {gen.summary(c)}.\n"
            f"2. {KINDS['make_decision'][0]} with nothing known about the user, the usual answer is {floor}.\n"
            f"Answer: {floor}"
        )

    # ------------------------------------------------------------------ judge

    def judge(self, meta: dict, prompt: str) -> str:
        key = ("judge", _digest(prompt), meta.get("sample", 0))
        if _u("unparsable", *key) < RATES["judge_unparsable"]:
            return "This reasoning looks mostly fine to me."
        reasoning = prompt.split("Reasoning:\n", 1)[-1].split("\n\nFinal answer:", 1)[0]
        lines = [re.sub(r"^\d+\.\s*", "", line) for line in reasoning.splitlines() if line.strip()]
        repeated = len(lines) - len(set(lines))
        # a repeated step breaks the flow (logical consistency 4) and the brevity (conciseness 1): ≤ 15, dropped
        scores = {
            "logical_consistency": 2 if _u("harsh", *key) < RATES["judge_harsh"] else 5 - bool(repeated),
            "factual_accuracy": 4 + (_u("fact", *key) < 0.5),
            "completeness": 4 + (len(lines) >= 4),
            "conciseness": 1 if repeated else 4 + (_u("conc", *key) < 0.5),
        }
        return "{" + ", ".join(f'"{k}": {v}' for k, v in scores.items()) + "}"

    # ------------------------------------------------------------------ taggers

    @staticmethod
    def _steps(prompt: str) -> list[tuple[str, str]]:
        """(kind, text) for each numbered step of the reasoning in a tagging prompt."""
        reasoning = prompt.split("Reasoning:\n", 1)[-1]
        out = []
        for line in reasoning.splitlines():
            text = re.sub(r"^\d+\.\s*", "", line).strip()
            if text:
                kind = next(
                    (k for k in KINDS if text.startswith(tuple(o[k] for o in OPENERS.values()))), "analyze_input"
                )
                out.append((kind, text))
        return out

    def explore(self, meta: dict, prompt: str) -> str:
        key = ("explore", _digest(prompt), meta.get("sample", 0))
        parts = []
        for i, (kind, text) in enumerate(self._steps(prompt)):
            syn = SYNONYMS[kind]
            u = _u("syn", i, *key)  # the canonical name half the time, else one of the variants
            name = syn[0] if u < 0.5 else syn[1 + int((u - 0.5) * 2 * (len(syn) - 1))]
            parts.append(f"<{name}> {text} </{name}>")
        if parts and _u("unclosed", *key) < RATES["explore_unclosed"]:
            parts[-1] = parts[-1].rsplit(" </", 1)[0]
        return "\n".join(parts)

    def restrict(self, meta: dict, prompt: str) -> str:
        key = ("restrict", _digest(prompt), meta.get("sample", 0))
        offered = re.findall(r"<([a-z0-9_]+)>", prompt.split("Reasoning:\n", 1)[0])
        emb = self._embed.embed(offered)  # (9, D)
        steps = self._steps(prompt)
        if _u("merge", *key) < RATES["restrict_merge"] and len(steps) > 2:
            steps = [steps[0], (steps[-1][0], " ".join(t for _, t in steps[1:]))]
        parts = []
        for kind, text in steps:
            sims = emb @ self._embed.embed(list(SYNONYMS[kind])).T  # (9, synonyms)
            name = offered[int(sims.max(1).argmax())]
            parts.append(f"<{name}> {text} </{name}>")
        if parts and _u("oov", *key) < RATES["restrict_out_of_vocab"]:
            j = int(_u("oovstep", *key) * len(parts))
            parts[j] = re.sub(r"<(/?)[a-z0-9_]+>", r"<\1reflect_further>", parts[j])
        if parts and _u("unclosed", *key) < RATES["restrict_unclosed"]:
            parts[-1] = parts[-1].rsplit(" </", 1)[0]
        return "\n".join(parts)
