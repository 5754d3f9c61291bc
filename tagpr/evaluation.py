"""Evaluation on LaMP: the methods of TagPR's Table 1, the official metrics, a table laid out like the paper's.

| method | prompt | answer |
|---|---|---|
| zero-shot | the LaMP input alone | the whole reply |
| rag | the official augmentation with the k retrieved profile items | the whole reply |
| rag-r | rag + "reason step by step inside <think>, then answer" (the paper's "Base") | after `</think>` |
| pag | rag, preceded by a summary of the user's history that the same model wrote first | the whole reply |
| r2p | rag + R2P's template, intervention and self-referencing (`tagpr.r2p`) | after `</think>` |
| tagpr | the TagPR prompt (`tagpr.prompts.tagpr_prompt`) for a trained policy | after `</think>` |
| oracle | synthetic users only: each question's latent rule applied (no model): the ceiling | |
| floor | synthetic users only: the answer most users would give to the input, profile unseen (no model) | |

Model calls are greedy (R2P's candidates are sampled, as R2P does); `Settings.temperature` and
`sample` make them the k-th sample at that temperature instead (`evaluate_split(samples=k)` scores
the mean over k samples: the score RL optimises). `lamp.swap_profiles` gives every question another
held-out user's profile: the control that tells personalization from a task's global answer.
Every metric comes with its per-question scores (`scores.json`) and a 95 % bootstrap interval.
Calls go through a `tagpr.llm` backend (`hf:` our KV-cache sampler, or an OpenAI-compatible endpoint), whose
request cache makes a killed evaluation resume where it stopped. Answers are only stripped:
an invalid or missing prediction is scored by the official rules (a miss; the worst rating),
never dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import lamp, metrics, plot, prompts, r2p, retrieval, synthetic
from .files import DataError, read_json, write_json, write_jsonl
from .llm import Backend, Request
from .rewards import extract_answer
from .tags import DEFAULT_TAGS

METHODS = ("zero-shot", "rag", "rag-r", "pag", "r2p", "tagpr", "oracle", "floor")
LABELS = {
    "zero-shot": "Zero-shot",
    "rag": "RAG",
    "rag-r": "RAG-R (base)",
    "pag": "PAG",
    "r2p": "R2P",
    "tagpr": "TagPR",
    "oracle": "Oracle (latent rule)",
    "floor": "No-profile floor",
}
NO_MODEL = ("oracle", "floor")  # methods that read the synthetic users' latent rules instead of asking a model
REASON = (
    "First reason step by step about the user's history and the input inside <think> ... </think>, then "
    "after </think> write only the answer, formatted exactly as the question asks."
)
PAG_SUMMARY = (
    "Here is a user's history: {items}.\n\nIn two or three sentences, summarize what this history shows "
    "about the user's preferences and style."
)

# TagPR Table 1 (LaMP dev, Qwen3-8B backbone), quoted from arXiv 2509.23140 for side-by-side reading
PAPER_TABLE1 = {
    "Zero-shot": (0.498, 0.470, 0.318, 0.244, 0.639, 0.983, 0.144, 0.125, 0.417, 0.351, 0.465, 0.413),
    "RAG": (0.668, 0.645, 0.414, 0.361, 0.354, 0.710, 0.158, 0.139, 0.453, 0.384, 0.473, 0.419),
    "RAG-R (base)": (0.717, 0.722, 0.453, 0.413, 0.291, 0.645, 0.152, 0.137, 0.434, 0.365, 0.439, 0.391),
    "R2P": (0.729, 0.730, 0.487, 0.459, 0.267, 0.557, 0.176, 0.155, 0.459, 0.396, 0.489, 0.426),
    "PrLM": (0.731, 0.731, 0.534, 0.504, 0.288, 0.635, 0.183, 0.169, 0.499, 0.438, 0.513, 0.459),
    "GPT-4o": (0.733, 0.733, 0.542, 0.512, 0.254, 0.554, 0.191, 0.175, 0.470, 0.407, 0.475, 0.419),
    "TagPR": (0.803, 0.803, 0.598, 0.557, 0.218, 0.263, 0.234, 0.213, 0.542, 0.471, 0.565, 0.507),
}
COLUMNS = [
    ("LaMP_1", "accuracy", "L1 acc ↑"),
    ("LaMP_1", "f1", "L1 F1 ↑"),
    ("LaMP_2", "accuracy", "L2 acc ↑"),
    ("LaMP_2", "f1", "L2 F1 ↑"),
    ("LaMP_3", "MAE", "L3 MAE ↓"),
    ("LaMP_3", "RMSE", "L3 RMSE ↓"),
    ("LaMP_4", "rouge-1", "L4 R-1 ↑"),
    ("LaMP_4", "rouge-L", "L4 R-L ↑"),
    ("LaMP_5", "rouge-1", "L5 R-1 ↑"),
    ("LaMP_5", "rouge-L", "L5 R-L ↑"),
    ("LaMP_7", "rouge-1", "L7 R-1 ↑"),
    ("LaMP_7", "rouge-L", "L7 R-L ↑"),
]


@dataclass
class Settings:
    k: int = 8
    retriever: str = "recency"
    seed: int = 0
    max_new_direct: int = 48
    max_new_reason: int = 320
    vocab: Sequence[str] = DEFAULT_TAGS
    r2p: r2p.Settings = field(default_factory=r2p.Settings)
    temperature: float = 0.0  # 0: greedy; else every model call samples at it
    sample: int = 0  # which sample (a seed of its own, a cache key of its own)


def _user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def run_method(
    backend: Backend | None,
    method: str,
    split: lamp.Split,
    questions: Sequence[lamp.Question],
    s: Settings,
    encoder=None,
    lamp_dir=None,
    split_name: str = "dev",
) -> list[dict]:
    """One trace per question: id, prompt, output, answer (+ R2P's candidates and interventions)."""
    task = split.task
    items = [retrieval.retrieve(task, q, s.k, s.retriever, s.seed, encoder) for q in questions]
    rag = [lamp.augment(task, q.input, it) for q, it in zip(questions, items)]
    greedy = lambda texts, n, tag: backend.chat(
        [Request(_user(t), {"role": method}, s.temperature, n, s.sample) for t in texts],
        progress=f"{method} {task.name}{tag}",
    )
    if method in NO_MODEL:
        latent = synthetic.read_latent(lamp_dir, task.name, split_name)
        out = []
        for q in questions:
            lat, c = latent[q.id], synthetic.restore_content(latent[q.id]["content"])
            answer = (
                synthetic.latent_generator(task.name, lat).answer(lat["rule"], c)
                if method == "oracle"
                else synthetic.floor_answer(task.name, c, lat.get("difficulty", "hard"))
            )
            out.append({"id": q.id, "prompt": "", "output": "", "answer": answer})
        return out
    if method == "r2p":
        res = r2p.r2p(backend, rag, [task] * len(rag), s.r2p)
        return [{"id": q.id, "prompt": p, **r} for q, p, r in zip(questions, rag, res)]
    if method == "zero-shot":
        texts, n, reasons = [q.input for q in questions], s.max_new_direct, False
    elif method == "rag":
        texts, n, reasons = rag, s.max_new_direct, False
    elif method == "rag-r":
        texts, n, reasons = [f"{p}\n\n{REASON}" for p in rag], s.max_new_reason, True
    elif method == "tagpr":
        texts = [prompts.tagpr_prompt(task, q, it, s.vocab) for q, it in zip(questions, items)]
        n, reasons = s.max_new_reason, True
    elif method == "pag":
        summaries = greedy(
            [
                PAG_SUMMARY.format(items=", and ".join(task.phrase.format(**i.fields) for i in it)) if it else ""
                for it in items
            ],
            s.max_new_direct * 2,
            " summary",
        )
        texts = [f"A summary of this user's history: {m.text.strip()}\n\n{p}" for m, p in zip(summaries, rag)]
        n, reasons = s.max_new_direct, False
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    replies = greedy(texts, n, "")
    return [
        {
            "id": q.id,
            "prompt": t,
            "output": r.text,
            "error": r.error,
            "answer": (extract_answer(r.text) if reasons else r.text.strip()) if not r.error else "",
        }
        for q, t, r in zip(questions, texts, replies)
    ]


def evaluate_split(
    backend,
    method: str,
    split: lamp.Split,
    out: Path,
    s: Settings,
    limit: int = 0,
    encoder=None,
    lamp_dir=None,
    split_name: str = "dev",
    samples: int = 0,
    swap: bool = False,
    allow_failures: bool = False,
) -> dict:
    """Run one method on one task; write predictions (official format), traces, per-question scores and metrics;
    return the metrics, with `n` (questions) and `<primary>_ci95` (95 % bootstrap interval).

    `samples` = k > 0: k samples per question at `s.temperature`; the metrics are the mean over the k
    samples' metrics, a question's score the mean of its k, predictions.json holds sample 0's answers.
    `swap`: every question shows another user's profile (`lamp.swap_profiles`). A finished (method, task)
    folder is reused as it is; an unfinished one resumes from the backend's cache.

    A failed model call is never scored: if any failed, the traces are written (each with its `error`) and the
    run stops with an error naming the count and the first one; `allow_failures` scores them as unanswered and
    records the count (`failures`) beside `n`.
    """
    qs = split.questions[:limit] if limit else split.questions
    golds = {q.id: split.golds[q.id] for q in qs}
    d = out / split.task.name
    if (d / "metrics.json").is_file() and (d / "scores.json").is_file():
        m = read_json(d / "metrics.json")
        if m.get("n") == len(qs):
            return m
    shown = lamp.swap_profiles(qs) if swap else list(qs)
    runs = [dataclasses.replace(s, sample=j) for j in range(samples)] if samples else [s]
    traces = [run_method(backend, method, split, shown, r, encoder, lamp_dir, split_name) for r in runs]
    ids = [q.id for q in qs]
    g = [golds[i] for i in ids]
    failed = [t for tr in traces for t in tr if t.get("error")]
    if failed and not allow_failures:
        write_jsonl(
            d / "traces.jsonl",
            [{**t, "sample": j} for j, tr in enumerate(traces) for t in tr] if samples else traces[0],
        )
        raise DataError(
            f"{method} on {split.task.name}: {len(failed)} of {sum(map(len, traces))} model calls failed (first: "
            f"{failed[0]['id']}: {failed[0]['error']}); nothing scored (traces: {d / 'traces.jsonl'}). Rerun to "
            "retry them, or pass --allow-failures to score them as unanswered"
        )
    per_run = [{t["id"]: t["answer"] for t in tr} for tr in traces]
    lamp.write_outputs(d / "predictions.json", split.task, per_run[0])
    lamp.write_outputs(d / "golds.json", split.task, golds)
    write_jsonl(
        d / "traces.jsonl", [{**t, "sample": j} for j, tr in enumerate(traces) for t in tr] if samples else traces[0]
    )
    ms = [
        metrics.evaluate(split.task, golds, p, golds_path=d / "golds.json", preds_path=d / "predictions.json")
        for p in per_run
    ]
    m = {k: sum(x[k] for x in ms) / len(ms) for k in ms[0]}
    per_q = [metrics.per_question(split.task, g, [p[i] for i in ids]) for p in per_run]
    scores = [sum(col) / len(col) for col in zip(*per_q)]
    primary = metrics.PRIMARY[split.task.kind]
    m.update({"n": len(ids), f"{primary}_ci95": list(metrics.bootstrap_ci(scores)), "samples": max(samples, 1)})
    if failed:
        m["failures"] = len(failed)
    m.update(parse_split(split.task, per_q, [[metrics.parses(split.task, p[i]) for i in ids] for p in per_run]))
    write_json(d / "scores.json", dict(zip(ids, scores)))
    write_json(d / "metrics.json", m)
    return m


def parse_split(task: lamp.Task, per_run: list[list[float]], parsed: list[list[bool]]) -> dict:
    """A score's two parts, each with its 95 % bootstrap interval over questions: `parsed`, the share of answers
    that parse (`metrics.parses`), and `<primary>_parsed`, the score among those answers alone (pooled over the
    samples; absent when none parses). `per_run[j][q]` is sample j's score of question q, `parsed[j][q]` whether it
    parsed."""
    per_question = [(list(sc), list(ok)) for sc, ok in zip(zip(*per_run), zip(*parsed))]
    share = [sum(ok) / len(ok) for _, ok in per_question]
    out = {"parsed": sum(share) / len(share) if share else 0.0, "parsed_ci95": list(metrics.bootstrap_ci(share))}
    if any(any(ok) for _, ok in per_question):
        among = lambda qs: metrics.pooled([sc for sc, _ in qs], [ok for _, ok in qs])
        key = f"{metrics.PRIMARY[task.kind]}_parsed"
        out[key] = among(per_question)
        out[f"{key}_ci95"] = list(metrics.bootstrap_stat_ci(per_question, among))
    return out


def cell(m: dict, key: str) -> str:
    """ "0.344 [0.234, 0.453]": a metric and, where evaluate_split gave it one, its 95 % bootstrap interval; with
    failed model calls scored as unanswered (--allow-failures), the question count and the failures."""
    ci = m.get(f"{key}_ci95")
    failed = f" (n = {m['n']}, {m['failures']} model calls failed)" if m.get("failures") else ""
    return f"{m[key]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "") + failed


def table(results: dict[str, dict[str, dict]], paper: bool = False, title: str = "") -> str:
    """Markdown laid out like TagPR's Table 1: one row per setting, the evaluated tasks' columns.
    `paper`: add the paper's reported rows (real LaMP dev; Qwen3-8B backbone except GPT-4o), labelled as quoted."""
    tasks = {t for r in results.values() for t in r}
    cols = [c for c in COLUMNS if c[0] in tasks]
    head = "| method | " + " | ".join(c[2] for c in cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    rows = []
    for name, r in results.items():
        cells = [cell(r[t], m) if t in r and m in r[t] else "–" for t, m, _ in cols]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    if paper:
        for name, vals in PAPER_TABLE1.items():
            cells = [f"{vals[COLUMNS.index(c)]:.3f}" for c in cols]
            rows.append(f"| *paper Table 1: {name}* | " + " | ".join(cells) + " |")
    note = (
        (
            "\n*paper Table 1* rows: quoted from TagPR (arXiv 2509.23140), real LaMP dev, Qwen3-8B backbone "
            "(GPT-4o: the API model); not comparable with synthetic users.\n"
        )
        if paper
        else ""
    )
    return (f"{title}\n\n" if title else "") + head + "\n".join(rows) + "\n" + note + parse_table(results)


def parse_table(results: dict[str, dict[str, dict]]) -> str:
    """Markdown: for each setting and task, the share of answers that parse and the primary score among them (each
    with its interval). A score is their product where unparsed answers score 0 (classification, ROUGE)."""
    tasks = sorted({t for r in results.values() for t, m in r.items() if "parsed" in m})
    if not tasks:
        return ""
    head = (
        "| method | "
        + " | ".join(f"{t} parsed | {t} {metrics.PRIMARY[lamp.get_task(t).kind]} among parsed" for t in tasks)
        + " |\n|---|"
        + "---|---|" * len(tasks)
        + "\n"
    )
    rows = []
    for name, r in results.items():
        cells = []
        for t in tasks:
            key = f"{metrics.PRIMARY[lamp.get_task(t).kind]}_parsed"
            cells += [
                cell(r[t], "parsed") if t in r and "parsed" in r[t] else "–",
                cell(r[t], key) if t in r and key in r[t] else "–",
            ]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\nThe parse split: answers that parse, and the score among them alone.\n\n" + head + "\n".join(rows) + "\n"


def sweep_plot(results: dict[str, dict[str, dict]], xs: Sequence, xlabel: str, path: Path) -> Path:
    """One panel per task: the task's first metric of each setting against the sweep variable."""
    panels = []
    for task in sorted({t for r in results.values() for t in r}):
        metric = next(m for t, m, _ in COLUMNS if t == task)
        panels.append(
            (
                f"{task} {metric}",
                {
                    LABELS.get(method, method): [results.get(f"{method}@{x}", {}).get(task, {}).get(metric) for x in xs]
                    for method in sorted({name.split("@")[0] for name in results})
                },
            )
        )
    return plot.panels_plot(panels, xs, xlabel, path)
