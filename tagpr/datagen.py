"""The tagged-reasoning data pipeline (TagPR §3.2): teacher rollouts, two-stage filtering,
two-phase tagging with clustering, PRMU preference pairs and RL prompts.

    1 sample      N instances per task from LaMP train, profile retrieved as in training (k = 8 most recent)
    2 teacher     K chains per instance with the profile (+ one without, for PRP pairs): "reason step by
                  step about the user's history, then `Answer:`"
    3 accuracy    classification / rating: exact after the official normalisation; generation: ROUGE-1 ≥ τ
    4 judge       logical consistency, factual accuracy, completeness, conciseness (1–5 each); keep sum > 15
    5 explore     free tags per step → names embedded → weighted k-means (k = 9) → `tags.json`
    6 restrict    re-tag with only the 9 tags; format filter (`tagpr.tags.check`); `spot_check.md`
    7 emit        sft.jsonl · prp.jsonl · pqp.jsonl · rl_prompts.jsonl (schemas of the trainers)

Every stage counts what went in, what came out and why the rest was dropped, into
`manifest.json`. Resuming is by the LLM backends' request caches: a rerun recomputes every
stage from cached replies and asks only what it has no answer for. The intermediate
records of each stage are written under `work/` for inspection.

Departures and choices (the paper leaves these open):
1. The ROUGE threshold (generation accuracy filter) is ours: ROUGE-1 F ≥ 0.3 by default.
2. Ratings (LaMP-3) are filtered exactly, like classification.
3. An SFT record's id is `<question id>-c<k>` (several chains of one instance can survive).
4. PRP / PQP rejected responses are re-tagged with the 9 tags so that PRMU compares two
   responses of the same form (one extra tagger call per pair); a rejected response only
   needs a well-formed tagging, not ≥ 3 tags from the vocabulary.
5. PQP: chosen = the kept chain with the best accuracy score (ties: judge composite), rejected =
   the instance's worst-scoring chain that has an answer, when its score is lower.
6. RL prompts come from train questions not used for SFT, those of users with PRP / PQP pairs
   first (so PRMU has learned their embedding: R_p knows the user), then the rest; when a task
   runs out, the manifest says how many it got, and how many have a user with pairs. Where every
   user has one question (LaMP's user-based splits) no RL prompt's user has pairs: R_p then scores
   through PRMU's trained unknown-user row (`train_prmu.py`, departure 4). Pairs for the RL
   instances themselves would need the teacher, judge and tagger on every RL instance too (the
   paper's 1,024–3,200 RL prompts a task: more calls than the SFT data), so they are not made.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import lamp, retrieval, tags
from .cluster import cluster_tags
from .files import DataError, atomic_write_text, write_json, write_jsonl
from .llm import Backend, Request
from .metrics import label_index, rouge_pairs
from .prompts import tagpr_prompt
from .records import Pair, RLPrompt, SFTRecord


class NoData(DataError):
    """A stage left nothing for the next one; the manifest written so far says where it went (a user-facing error:
    the input or the backends, not the code)."""


JUDGE_KEYS = ("logical_consistency", "factual_accuracy", "completeness", "conciseness")


# ----------------------------------------------------------------------------- prompts and parsers

TEACHER_WITH_PROFILE = (
    "Before answering, reason step by step about what this user's history above shows about "
    "them and how it applies to this input. Write each step on its own numbered line (1., 2., "
    "...). Then write the final answer on a last line that starts with `Answer:`, formatted "
    "exactly as the question asks."
)
TEACHER_BLIND = (
    "Before answering, reason step by step about the input. Write each step on its own numbered line "
    "(1., 2., ...). Then write the final answer on a last line that starts with `Answer:`, formatted "
    "exactly as the question asks."
)


def teacher_prompt(task: lamp.Task, q: lamp.Question, items: Sequence[lamp.Item], with_profile: bool) -> str:
    if with_profile:
        return f"{lamp.augment(task, q.input, items)}\n\n{TEACHER_WITH_PROFILE}"
    return f"{q.input}\n\n{TEACHER_BLIND}"


_ANSWER = re.compile(r"^\s*[*_#]*\s*answer\s*[*_]*\s*:\s*[*_]*\s*(.*)$", re.IGNORECASE)


def parse_teacher(text: str) -> tuple[str, str, str]:
    """(reasoning, answer, problem): a thinking model's `<think>` block counts as reasoning; the answer is
    the last `Answer:` line. `problem` is "" when both are present, else why not."""
    reasoning, rest = "", text
    if tags.THINK_CLOSE in text:
        head, rest = text.split(tags.THINK_CLOSE, 1)
        reasoning = head.replace(tags.THINK_OPEN, "").strip()
    lines = rest.strip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        m = _ANSWER.match(lines[i])
        if m:
            reasoning = "\n".join(x for x in (reasoning, "\n".join(lines[:i]).strip()) if x)
            answer = m.group(1).strip().strip("`").strip()
            if not answer:
                return reasoning, "", "empty_answer"
            return reasoning, answer, "" if reasoning else "no_reasoning"
    return reasoning, "", "no_answer"


def judge_prompt(task: lamp.Task, q: lamp.Question, items, reasoning: str, answer: str, gold: str) -> str:
    return (
        "You are grading the reasoning of an assistant that personalizes its answer to a user.\n\n"
        f"Question, with the user's history:\n{lamp.augment(task, q.input, items)}\n\n"
        f"Reasoning:\n{reasoning}\n\nFinal answer: {answer}\nReference answer: {gold}\n\n"
        "Score the reasoning from 1 (poor) to 5 (excellent) on: logical_consistency (each step follows from "
        "the last and leads to the answer), factual_accuracy (it states the input and the history correctly), "
        "completeness (it uses the history that matters), conciseness (no repetition or padding). "
        'Reply with JSON only: {"logical_consistency": n, "factual_accuracy": n, "completeness": n, '
        '"conciseness": n}'
    )


def parse_judge(text: str) -> dict[str, int] | None:
    """The four 1–5 scores, or None when any is missing or out of range."""
    body = text.split(tags.THINK_CLOSE, 1)[-1]
    out = {}
    for k in JUDGE_KEYS:
        m = re.search(rf'"?{k}"?\s*[:=]\s*"?(\d+)', body)
        if not m or not 1 <= int(m.group(1)) <= 5:
            return None
        out[k] = int(m.group(1))
    return out


def explore_prompt(reasoning: str) -> str:
    return (
        "Split the reasoning below into its steps. Wrap each step in a tag that you name yourself after what "
        "the step does, in snake_case, like <tag_name> step text </tag_name>. Keep the text of every step. "
        f"Output only the tagged steps.\n\nReasoning:\n{reasoning}"
    )


def restrict_prompt(reasoning: str, vocab: Sequence[str], min_tags: int) -> str:
    names = ", ".join(f"<{t}>" for t in vocab)
    return (
        f"Split the reasoning below into its steps and wrap each step in exactly one of these tags, the one "
        f"that fits what the step does: {names}. Use no other tag and at least {min_tags} steps. Keep the text "
        f"of every step. Output only the tagged steps.\n\nReasoning:\n{reasoning}"
    )


def parse_tagged(text: str) -> tags.Parsed:
    """Tagged steps in a reply (a thinking model's `<think>` block dropped) as a `tags.Parsed`."""
    body = text.split(tags.THINK_CLOSE, 1)[-1] if tags.THINK_CLOSE in text else text
    return tags.parse(f"{tags.THINK_OPEN}\n{body.strip()}\n{tags.THINK_CLOSE}\n-")


def normalise_tag(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


# ----------------------------------------------------------------------------- records


@dataclass
class Instance:
    id: str
    task: lamp.Task
    question: lamp.Question
    items: list[lamp.Item]
    gold: str

    @property
    def user_id(self) -> str:
        return self.question.user_id or self.question.id

    def meta(self, role: str, **kw) -> dict:
        return {"role": role, "id": self.id, "task": self.task.name, "items": [it.id for it in self.items], **kw}


@dataclass
class Chain:
    inst: Instance
    sample: int  # -1: the no-profile response
    reasoning: str = ""
    answer: str = ""
    score: float = 0.0  # accuracy: 1/0 exact, or ROUGE-1 F
    judge: dict = field(default_factory=dict)
    steps: list = field(default_factory=list)  # restricted tagging: [(tag, text)]

    def row(self) -> dict:
        return {
            "id": self.inst.id,
            "sample": self.sample,
            "reasoning": self.reasoning,
            "answer": self.answer,
            "score": self.score,
            "judge": self.judge,
            "steps": self.steps,
        }


class Stage:
    """Counts of one stage: in, out and the reasons for what was dropped."""

    def __init__(self, name: str, n_in: int):
        self.name, self.n_in, self.n_out, self.dropped = name, n_in, 0, Counter()

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1

    def as_dict(self) -> dict:
        assert self.n_out + sum(self.dropped.values()) == self.n_in, (self.name, self.n_in, self.n_out, self.dropped)
        return {"in": self.n_in, "out": self.n_out, "dropped": dict(sorted(self.dropped.items()))}


def accuracy(task: lamp.Task, answers: Sequence[str], golds: Sequence[str]) -> list[float]:
    """1/0 for exact classification / rating answers (official label normalisation); ROUGE-1 F for generation."""
    if task.is_generation:
        return rouge_pairs(list(golds), list(answers))[0]
    return [
        float(label_index(task.labels, g) >= 0 and label_index(task.labels, a) == label_index(task.labels, g))
        for a, g in zip(answers, golds)
    ]


# ----------------------------------------------------------------------------- the pipeline


@dataclass
class Settings:
    tasks: Sequence[str]
    instances_per_task: int = 1000
    chains: int = 16
    k: int = 8
    retriever: str = "recency"
    rouge_threshold: float = 0.3
    judge_threshold: int = 15
    n_tags: int = 9
    kmeans_restarts: int = 50
    min_tags: int = 3
    rl_per_task: int = 1024
    rl_lamp2: int = 3200
    spot_check: int = 20
    teacher_temperature: float = 1.0
    max_tokens: int = 2048
    seed: int = 0


def sample_instances(lamp_dir, settings: Settings) -> tuple[dict[str, list[Instance]], dict[str, list[Instance]], dict]:
    """Per task: the SFT instances and the rest of train (for RL prompts). Empty profiles are dropped, counted."""
    chosen, rest, counts = {}, {}, {}
    for name in settings.tasks:
        split = lamp.load_split(lamp_dir, name, "train")
        stage = Stage("sample", len(split.questions))
        usable = []
        for q in split.questions:
            if not q.profile:
                stage.drop("empty_profile")
                continue
            usable.append(q)
        rng = random.Random(f"tagpr-build:{name}:{settings.seed}")
        rng.shuffle(usable)
        n = min(settings.instances_per_task, len(usable))
        stage.n_out = n
        stage.dropped["not_sampled"] = len(usable) - n

        def make(q, split=split):
            return Instance(
                q.id,
                split.task,
                q,
                retrieval.retrieve(split.task, q, settings.k, settings.retriever, settings.seed),
                split.golds[q.id],
            )

        chosen[split.task.name] = [make(q) for q in usable[:n]]
        rest[split.task.name] = [make(q) for q in usable[n:]]
        counts[split.task.name] = stage.as_dict()
    return chosen, rest, counts


def build(
    lamp_dir, out: Path, settings: Settings, backends: dict[str, Backend], log: Callable[[str], None] = print
) -> dict:
    """Run every stage (the table in the module docstring); write the outputs and `manifest.json` under `out`;
    return the manifest."""
    work = out / "work"
    manifest: dict = {
        "lamp_dir": str(lamp_dir),
        "backends": {r: b.describe() for r, b in backends.items()},
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(settings).items()},
        "stages": {},
    }
    stages = manifest["stages"]
    chosen, rest, stages["1_sample"] = sample_instances(lamp_dir, settings)
    insts = [i for task in chosen.values() for i in task]
    log(f"1 sample: {len(insts)} instances from {len(chosen)} tasks")
    parsed, blind, stages["2_teacher"] = teacher_stage(insts, settings, backends["teacher"], work, log)
    passed, stages["3_accuracy"] = accuracy_stage(chosen, parsed, blind, settings, log)
    judged, stages["4_judge"] = judge_stage(passed, settings, backends["judge"], work, log)
    free, stages["5_explore"] = explore_stage(judged, settings, backends["tagger"], work)
    if not free:
        manifest["calls"] = {role: b.stats() for role, b in backends.items()}
        write_json(out / "manifest.json", manifest)
        raise NoData(
            f"no chain survived to the exploratory tagging stage: the counts per stage are in {out / 'manifest.json'}"
        )
    vocab = primary_tags(free, settings, backends["embedder"], out, stages["5_explore"], log)
    final, stages["6_restrict"] = restrict_stage(judged, vocab, settings, backends["tagger"], out, work, log)
    stages.update(emit(chosen, rest, parsed, blind, final, vocab, settings, backends["tagger"], out, log))
    manifest["calls"] = {role: b.stats() for role, b in backends.items()}
    write_json(out / "manifest.json", manifest)
    return manifest


def teacher_stage(
    insts: list[Instance], settings: Settings, teacher: Backend, work: Path, log
) -> tuple[list[Chain], dict[str, Chain], dict]:
    """2: K chains per instance with the profile and one without. → (parsed chains, the no-profile chain per
    instance, manifest entry)."""
    requests, chains = [], []
    for inst in insts:
        for k in range(settings.chains):
            requests.append(
                Request(
                    [{"role": "user", "content": teacher_prompt(inst.task, inst.question, inst.items, True)}],
                    inst.meta("teacher", sample=k),
                    settings.teacher_temperature,
                    settings.max_tokens,
                    k,
                )
            )
            chains.append(Chain(inst, k))
        requests.append(
            Request(
                [{"role": "user", "content": teacher_prompt(inst.task, inst.question, [], False)}],
                inst.meta("teacher_blind", sample=0),
                settings.teacher_temperature,
                settings.max_tokens,
                0,
            )
        )
        chains.append(Chain(inst, -1))
    stage = Stage("teacher", len(requests))
    parsed, blind = [], {}
    for c, rep in zip(chains, teacher.chat(requests, progress="2 teacher")):
        if rep.error:
            stage.drop("llm_error")
            continue
        c.reasoning, c.answer, problem = parse_teacher(rep.text)
        if problem:
            stage.drop(problem)
            continue
        stage.n_out += 1
        if c.sample < 0:
            blind[c.inst.id] = c
        else:
            parsed.append(c)
    write_jsonl(work / "teacher.jsonl", [c.row() for c in parsed + list(blind.values())])
    log(f"2 teacher: {stage.n_out} of {stage.n_in} replies parsed")
    return parsed, blind, stage.as_dict()


def accuracy_stage(
    chosen: dict[str, list[Instance]], parsed: list[Chain], blind: dict[str, Chain], settings: Settings, log
) -> tuple[list[Chain], dict]:
    """3: score every chain (the no-profile ones too, for the pairs) against the gold; keep the correct ones
    (generation: ROUGE-1 ≥ threshold). → (passed chains, manifest entry)."""
    stage = Stage("accuracy", len(parsed))
    for task in chosen:
        mine = [c for c in parsed + list(blind.values()) if c.inst.task.name == task]
        for c, v in zip(
            mine, accuracy(mine[0].inst.task, [c.answer for c in mine], [c.inst.gold for c in mine]) if mine else []
        ):
            c.score = v
    passed = []
    for c in parsed:
        ok = c.score >= settings.rouge_threshold if c.inst.task.is_generation else c.score == 1.0
        if ok:
            passed.append(c)
            stage.n_out += 1
        else:
            stage.drop("rouge_below_threshold" if c.inst.task.is_generation else "wrong_answer")
    log(f"3 accuracy: {stage.n_out} of {stage.n_in} correct")
    return passed, stage.as_dict()


def judge_stage(passed: list[Chain], settings: Settings, judge: Backend, work: Path, log) -> tuple[list[Chain], dict]:
    """4: the judge's four 1–5 scores per chain; keep a composite above the threshold. → (kept, manifest entry)."""
    requests = [
        Request(
            [
                {
                    "role": "user",
                    "content": judge_prompt(
                        c.inst.task, c.inst.question, c.inst.items, c.reasoning, c.answer, c.inst.gold
                    ),
                }
            ],
            c.inst.meta("judge", sample=c.sample),
            0.0,
            256,
            c.sample,
        )
        for c in passed
    ]
    stage = Stage("judge", len(passed))
    judged = []
    for c, rep in zip(passed, judge.chat(requests, progress="4 judge")):
        scores = None if rep.error else parse_judge(rep.text)
        if rep.error:
            stage.drop("llm_error")
        elif scores is None:
            stage.drop("judge_unparsable")
        elif sum(scores.values()) <= settings.judge_threshold:
            c.judge = scores
            stage.drop("composite_at_most_threshold")
        else:
            c.judge = scores
            judged.append(c)
            stage.n_out += 1
    write_jsonl(work / "judged.jsonl", [c.row() for c in passed])
    log(f"4 judge: {stage.n_out} of {stage.n_in} above {settings.judge_threshold}")
    return judged, stage.as_dict()


def explore_stage(judged: list[Chain], settings: Settings, tagger: Backend, work: Path) -> tuple[Counter, dict]:
    """5a: free-form tags per step of every judged chain. → (count of each normalised free tag name, manifest
    entry)."""
    requests = [
        Request(
            [{"role": "user", "content": explore_prompt(c.reasoning)}],
            c.inst.meta("explore", sample=c.sample),
            0.0,
            settings.max_tokens,
            c.sample,
        )
        for c in judged
    ]
    stage = Stage("explore", len(judged))
    free: Counter = Counter()
    explored = []
    for c, rep in zip(judged, tagger.chat(requests, progress="5 explore")):
        p = parse_tagged(rep.text) if not rep.error else None
        if p is None:
            stage.drop("llm_error")
        elif not p.well_formed or not p.steps:
            stage.drop("malformed_tags")
        else:
            free.update(normalise_tag(t) for t in p.tags if normalise_tag(t))
            explored.append({"id": c.inst.id, "sample": c.sample, "tags": p.tags})
            stage.n_out += 1
    entry = stage.as_dict()
    entry["note"] = "a drop here only keeps a chain's tags out of the clustering; stage 6 re-tags every judged chain"
    write_jsonl(work / "explore.jsonl", explored)
    return free, entry


def primary_tags(free: Counter, settings: Settings, embedder: Backend, out: Path, entry: dict, log) -> tuple[str, ...]:
    """5b: embed the free tag names, cluster them (weighted k-means), name each cluster by its most used member;
    `tags.json`. → the primary tags."""
    names = list(free)
    clusters = cluster_tags(dict(free), embedder.embed(names), settings.n_tags, settings.kmeans_restarts, settings.seed)
    vocab = tuple(c.name for c in clusters)
    write_json(
        out / "tags.json", {"tags": [{"name": c.name, "count": c.count, "members": c.members} for c in clusters]}
    )
    entry["free_tag_names"] = len(names)
    entry["primary_tags"] = {c.name: c.count for c in clusters}
    log(f"5 explore: {len(names)} free tag names → {len(vocab)} primary tags: {', '.join(vocab)}")
    return vocab


def retag(
    chains: list[Chain],
    vocab: tuple[str, ...],
    role: str,
    strict: bool,
    stage: Stage,
    settings: Settings,
    tagger: Backend,
) -> list[Chain]:
    """Tag each chain's steps with the primary tags only; `strict`: the whole format filter (format, vocabulary,
    at least `min_tags`), else a well-formed tagging. → the chains that pass, with their steps."""
    requests = [
        Request(
            [{"role": "user", "content": restrict_prompt(c.reasoning, vocab, settings.min_tags)}],
            c.inst.meta(role, sample=c.sample),
            0.0,
            settings.max_tokens,
            c.sample,
        )
        for c in chains
    ]
    good = []
    for c, rep in zip(chains, tagger.chat(requests, progress=f"6 {role}")):
        if rep.error:
            stage.drop("llm_error")
            continue
        p = parse_tagged(rep.text)
        checks = tags.check(p, vocab, settings.min_tags)
        failed = (
            [k for k in ("format", "vocab", "count") if not checks[k]]
            if strict
            else ([] if checks["format"] and p.steps else ["format"])
        )
        if failed:
            stage.drop(f"tag_{failed[0]}")
            continue
        c.steps = [(x.tag, x.text) for x in p.steps]
        good.append(c)
        stage.n_out += 1
    return good


def restrict_stage(
    judged: list[Chain], vocab: tuple[str, ...], settings: Settings, tagger: Backend, out: Path, work: Path, log
) -> tuple[list[Chain], dict]:
    """6: restricted re-tagging with the format filter; `spot_check.md`. → (the final chains, manifest entry)."""
    stage = Stage("restrict", len(judged))
    final = retag(judged, vocab=vocab, role="restrict", strict=True, stage=stage, settings=settings, tagger=tagger)
    write_jsonl(work / "tagged.jsonl", [c.row() for c in final])
    log(f"6 restrict: {stage.n_out} of {stage.n_in} pass the format filter")
    spot = random.Random(settings.seed).sample(final, min(settings.spot_check, len(final)))
    atomic_write_text(
        out / "spot_check.md",
        "# Spot check: a random sample of the final tagged chains\n\n"
        + "\n".join(
            f"## {c.inst.id} (sample {c.sample}, {c.inst.task.name}, judge {sum(c.judge.values())})\n\n```\n"
            f"{tags.render(c.steps, c.answer)}\n```\ngold: `{c.inst.gold}`\n"
            for c in spot
        ),
    )
    return final, stage.as_dict()


def emit(
    chosen,
    rest,
    parsed: list[Chain],
    blind: dict[str, Chain],
    final: list[Chain],
    vocab: tuple[str, ...],
    settings: Settings,
    tagger: Backend,
    out: Path,
    log,
) -> dict:
    """7: `sft.jsonl`, `prp.jsonl` / `pqp.jsonl` and `rl_prompts.jsonl`. → the manifest entries of this stage."""
    prompt_of = lambda inst: tagpr_prompt(inst.task, inst.question, inst.items, vocab, settings.min_tags)
    sft = [
        SFTRecord(
            f"{c.inst.id}-c{c.sample}",
            c.inst.task.name,
            c.inst.user_id,
            prompt_of(c.inst),
            tags.render(c.steps, "").strip(),
            c.answer,
        )
        for c in final
    ]
    write_jsonl(out / "sft.jsonl", [r.to_json() for r in sft])
    (prp, pqp), pair_entry = pairs(parsed, blind, final, vocab, settings, tagger, prompt_of)
    write_jsonl(out / "prp.jsonl", [p.to_json() for p in prp])
    write_jsonl(out / "pqp.jsonl", [p.to_json() for p in pqp])
    rl, rl_counts = rl_prompts(
        chosen, rest, {c.inst.id for c in final}, {p.user_id for p in prp + pqp}, settings, prompt_of
    )
    write_jsonl(out / "rl_prompts.jsonl", [r.to_json() for r in rl])
    log(f"7 emit: {len(sft)} SFT chains, {len(prp)} PRP + {len(pqp)} PQP pairs, {len(rl)} RL prompts → {out}")
    return {
        "7_pair_tagging": pair_entry,
        "7_emit": {
            "sft": len(sft),
            "prp": len(prp),
            "pqp": len(pqp),
            "rl_prompts": rl_counts,
            "sft_per_task": dict(Counter(r.task for r in sft)),
        },
    }


def pairs(
    parsed: list[Chain],
    blind: dict[str, Chain],
    final: list[Chain],
    vocab: tuple[str, ...],
    settings: Settings,
    tagger: Backend,
    prompt_of,
) -> tuple[tuple[list[Pair], list[Pair]], dict]:
    """PRP: an instance's best final chain ≻ its no-profile chain; PQP: ≻ its worst-scoring chain, when worse.
    Rejected chains are re-tagged (departure 4). → ((prp, pqp), manifest entry)."""
    by_inst: dict[str, list[Chain]] = {}
    for c in final:
        by_inst.setdefault(c.inst.id, []).append(c)
    best = {i: max(chains, key=lambda c: (c.score, sum(c.judge.values()), -c.sample)) for i, chains in by_inst.items()}
    every: dict[str, list[Chain]] = {}
    for c in parsed:
        every.setdefault(c.inst.id, []).append(c)
    prp_rej = [blind[i] for i in best if i in blind]
    pqp_rej = []
    for i, b in best.items():
        worst = min(every[i], key=lambda c: (c.score, c.sample))
        if worst.score < b.score:
            pqp_rej.append(worst)
    stage = Stage("pairs", len(prp_rej) + len(pqp_rej))
    prp, pqp = [], []
    rejected = prp_rej + pqp_rej
    for r in retag(
        rejected, vocab=vocab, role="restrict_rejected", strict=False, stage=stage, settings=settings, tagger=tagger
    ):
        b = best[r.inst.id]
        kind, bucket = ("prp", prp) if r.sample < 0 else ("pqp", pqp)
        bucket.append(
            Pair(
                f"{r.inst.id}-{kind}",
                kind,
                r.inst.user_id,
                r.inst.task.name,
                prompt_of(r.inst),
                tags.render(b.steps, b.answer),
                tags.render(r.steps, r.answer),
            )
        )
    return (prp, pqp), stage.as_dict()


def rl_prompts(
    chosen, rest, used: set[str], pair_users: set[str], settings: Settings, prompt_of
) -> tuple[list[RLPrompt], dict]:
    """RL prompts per task from the questions SFT did not use, those of users with pairs first (departure 6).
    → (prompts, per task: wanted, written, with a user that has pairs)."""
    rl, counts = [], {}
    for task in chosen:
        want = settings.rl_lamp2 if task.startswith("LaMP_2") else settings.rl_per_task
        pool = rest[task] + [i for i in chosen[task] if i.id not in used]
        pool.sort(key=lambda i: i.user_id not in pair_users)  # stable: the users PRMU learns first
        got = pool[:want]
        rl += [RLPrompt(i.id, task, i.user_id, prompt_of(i), i.gold) for i in got]
        counts[task] = {
            "wanted": want,
            "written": len(got),
            "user_has_pairs": sum(i.user_id in pair_users for i in got),
        }
    return rl, counts
