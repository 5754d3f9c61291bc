"""The official LaMP metrics, by the official evaluator's rules.

- LaMP-1 / LaMP-2: both strings stripped, mapped to the label's index (−1 when not
  exactly a label); `accuracy`, and `f1` = macro-F1 over **all** labels
  (`labels = range(n)`), so an invalid prediction is a miss and never a class of its
  own, and a label absent from both golds and predictions contributes F1 = 0.
- LaMP-3: predictions parsed as float; an unparsable one becomes the worst value
  (1 or 5, whichever is farther from the gold; 5 on a tie); no clipping;
  `MAE`, `RMSE` = sqrt(MSE).
- LaMP-4/5/6/7: ROUGE-1 and ROUGE-L F-measure from rouge-score, no stemming, its
  default tokenizer; `rouge-1`, `rouge-L`. Departure: the official number is the
  mid of a bootstrap (HF `evaluate`'s aggregator, unseeded); we report the plain
  mean, which differs in the 3rd–4th decimal, and give the seeded bootstrap mid with
  `bootstrap=N`.

CLI: `python -m tagpr.metrics --task LaMP_2 --golds dev_outputs.json --preds preds.json`
prints one JSON object with the official keys.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence

import numpy as np
from rouge_score import rouge_scorer

from . import lamp
from .files import DataError


def label_index(labels: Sequence[str], text: str) -> int:
    text = text.strip()
    try:
        return list(labels).index(text)
    except ValueError:
        return -1


def accuracy_f1(labels: Sequence[str], golds: Sequence[str], preds: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro-F1 over all labels; invalid predictions (−1) only ever miss."""
    g = [label_index(labels, x) for x in golds]
    p = [label_index(labels, x) for x in preds]
    if not g:
        return {"accuracy": 0.0, "f1": 0.0}
    acc = sum(a == b for a, b in zip(g, p)) / len(g)
    f1s = []
    for c in range(len(labels)):
        tp = sum(1 for a, b in zip(g, p) if a == c and b == c)
        fp = sum(1 for a, b in zip(g, p) if a != c and b == c)
        fn = sum(1 for a, b in zip(g, p) if a == c and b != c)
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    return {"accuracy": acc, "f1": sum(f1s) / len(f1s)}


def parse_rating(pred: str, gold: float) -> float:
    """A float, or the worst value for this gold when unparsable (the official rule)."""
    try:
        value = float(pred.strip())
        if math.isfinite(value):
            return value
    except ValueError:
        pass
    return 1.0 if abs(1 - gold) > abs(5 - gold) else 5.0


def mae_rmse(golds: Sequence[str], preds: Sequence[str]) -> dict[str, float]:
    g = [float(x.strip()) for x in golds]
    p = [parse_rating(x, y) for x, y in zip(preds, g)]
    if not g:
        return {"MAE": 0.0, "RMSE": 0.0}
    err = np.array(p) - np.array(g)
    return {"MAE": float(np.abs(err).mean()), "RMSE": float(np.sqrt((err**2).mean()))}


_SCORER = None


def rouge_pairs(golds: Sequence[str], preds: Sequence[str]) -> tuple[list[float], list[float]]:
    """Per-example ROUGE-1 and ROUGE-L F (rouge-score, no stemming; both stripped)."""
    global _SCORER
    if _SCORER is None:
        _SCORER = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    r1, rl = [], []
    for g, p in zip(golds, preds):
        s = _SCORER.score(g.strip(), p.strip())
        r1.append(s["rouge1"].fmeasure)
        rl.append(s["rougeL"].fmeasure)
    return r1, rl


def _bootstrap_mid(values: list[float], n: int, seed: int) -> float:
    """Median of `n` resampled means (rouge-score's BootstrapAggregator 'mid')."""
    rng = np.random.default_rng(seed)
    v = np.asarray(values)
    means = v[rng.integers(0, len(v), size=(n, len(v)))].mean(axis=1)
    return float(np.percentile(means, 50))


def rouge(golds: Sequence[str], preds: Sequence[str], bootstrap: int = 0, seed: int = 0) -> dict[str, float]:
    r1, rl = rouge_pairs(golds, preds)
    if not r1:
        return {"rouge-1": 0.0, "rouge-L": 0.0}
    if bootstrap:
        return {"rouge-1": _bootstrap_mid(r1, bootstrap, seed), "rouge-L": _bootstrap_mid(rl, bootstrap, seed)}
    return {"rouge-1": float(np.mean(r1)), "rouge-L": float(np.mean(rl))}


PRIMARY = {"classification": "accuracy", "rating": "MAE", "generation": "rouge-1"}  # the per-question metric


def per_question(task: lamp.Task | str, golds: Sequence[str], preds: Sequence[str]) -> list[float]:
    """Each question's share of the task's primary metric (`PRIMARY`): 1/0 correct, |error| (the official rule for
    an unparsable rating), ROUGE-1 F. Their mean is the official accuracy, MAE or ROUGE-1."""
    task = lamp.get_task(task) if isinstance(task, str) else task
    if task.kind == "classification":
        return [float(label_index(task.labels, g) == label_index(task.labels, p) >= 0) for g, p in zip(golds, preds)]
    if task.kind == "rating":
        return [abs(parse_rating(p, float(g)) - float(g)) for g, p in zip(golds, preds)]
    return rouge_pairs(golds, preds)[0]


def parses(task: lamp.Task | str, pred: str) -> bool:
    """Whether an answer is one the task can score as given: exactly a label of its set, a finite number for a
    rating, any non-empty text for generation. An answer that does not parse scores as a miss (classification),
    the worst rating, or ROUGE 0; "the score among parsed answers" leaves those out."""
    task = lamp.get_task(task) if isinstance(task, str) else task
    if not isinstance(pred, str):
        return False
    if task.kind == "classification":
        return label_index(task.labels, pred) >= 0
    if task.kind == "rating":
        try:
            return math.isfinite(float(pred.strip()))
        except ValueError:
            return False
    return bool(pred.strip())


def pooled(scores: Sequence[Sequence[float]], keep: Sequence[Sequence[bool]]) -> float:
    """Σ kept scores / Σ kept over all questions' answers (a question contributes what it kept); 0 when none."""
    num = sum(x for row, ks in zip(scores, keep) for x, k in zip(row, ks) if k)
    den = sum(k for ks in keep for k in ks)
    return num / den if den else 0.0


def bootstrap_stat_ci(
    per_question: Sequence, stat, n: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of any statistic of the questions: `stat(list of resampled questions)`, with
    the questions drawn with replacement as `bootstrap_ci` draws them (the same seed gives the same draws). For a
    ratio such as the score among parsed answers, or a paired difference of two models on the same questions."""
    items = list(per_question)
    if not items:
        return (0.0, 0.0)
    draws = np.random.default_rng(seed).integers(0, len(items), size=(n, len(items)))
    vals = [stat([items[i] for i in row]) for row in draws]
    lo, hi = np.percentile(vals, [50 * (1 - level), 50 * (1 + level)])
    return (float(lo), float(hi))


def bootstrap_ci(values: Sequence[float], n: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (questions resampled with replacement)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return (0.0, 0.0)
    means = v[np.random.default_rng(seed).integers(0, v.size, size=(n, v.size))].mean(axis=1)
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return (float(lo), float(hi))


def evaluate(
    task: lamp.Task | str,
    golds: Mapping[str, str],
    preds: Mapping[str, str],
    bootstrap: int = 0,
    golds_path="<golds>",
    preds_path="<predictions>",
) -> dict[str, float]:
    """Score predictions against golds with the task's official metric.

    `preds` must have exactly the gold ids. For LaMP-2 the version (movies or news) is
    read off the golds when `task` is the shared name "LaMP_2".
    """
    task = lamp.get_task(task) if isinstance(task, str) else task
    lamp.check_prediction_ids(golds, preds, preds_path, golds_path)
    ids = list(golds)
    g = [golds[i] for i in ids]
    p = [preds[i] for i in ids]
    if task.official == "LaMP_2" and g:
        in_movies = all(x.strip() in lamp.MOVIE_TAGS for x in g)
        in_news = all(x.strip() in lamp.NEWS_CATEGORIES for x in g)
        if task.name == "LaMP_2" and not in_movies and in_news:
            task = lamp.TASKS["LaMP_2N"]
        elif task.name == "LaMP_2N" and not in_news and in_movies:
            task = lamp.TASKS["LaMP_2"]
    if task.kind == "classification":
        bad = [i for i, x in zip(ids, g) if label_index(task.labels, x) < 0]
        if bad:
            raise DataError(
                f"{golds_path}: gold output of id={bad[0]} is not a {task.name} label "
                f"({len(bad)} such); labels: {list(task.labels)}"
            )
        return accuracy_f1(task.labels, g, p)
    if task.kind == "rating":
        for i, x in zip(ids, g):
            try:
                float(x)
            except ValueError:
                raise DataError(f"{golds_path}: gold output of id={i} is not a number: {x!r}") from None
        return mae_rmse(g, p)
    return rouge(g, p, bootstrap=bootstrap)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Official LaMP metrics")
    ap.add_argument("--task", help="LaMP_1 … LaMP_7 (LaMP_2N: the news version); default: the golds file's 'task'")
    ap.add_argument("--golds", required=True, help="{split}_outputs.json")
    ap.add_argument("--preds", required=True, help="predictions in the same format, same ids")
    ap.add_argument(
        "--bootstrap",
        type=int,
        default=0,
        help="ROUGE: report the seeded bootstrap mid over N resamples instead of the mean",
    )
    a = ap.parse_args(argv)
    name, golds = lamp.read_outputs(a.golds, a.task)
    _, preds = lamp.read_outputs(a.preds, a.task or name)
    print(json.dumps(evaluate(a.task or name, golds, preds, a.bootstrap, a.golds, a.preds)))


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
