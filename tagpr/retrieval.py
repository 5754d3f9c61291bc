"""Choosing k profile items for a question: recency (default), BM25, random, dense.

The query and each item's document are the official per-task ones
(`lamp.retrieval_query`, `lamp.item_text`).

- recency: newest first by `date`; undated items rank after dated ones; equal or
  missing dates: later in the file counts as newer.
- bm25: Okapi BM25 with k1 = 1.5, b = 0.75 on whitespace tokens (no lowercasing),
  idf = ln((N − n + 0.5) / (n + 0.5)) with negative idfs floored at
  0.25 × mean idf — the rule of the `rank_bm25` package the official code uses.
  Ties keep profile order (the official `argsort()[::-1]` reverses them).
- random: k items sampled without replacement, seeded by (seed, question id), so a
  question gets the same items whatever order questions come in.
- dense: any local transformers encoder, mean pooling over the attention mask, dot
  product (Contriever's recipe).
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Sequence

import torch
from transformers import AutoModel, AutoTokenizer

from . import lamp

RETRIEVERS = ("recency", "bm25", "random", "dense")


def _date_key(date: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", date)) if date else ()


def recency_order(items: Sequence[lamp.Item]) -> list[int]:
    """Indices of items, newest first."""
    return sorted(
        range(len(items)), key=lambda i: (items[i].date is not None, _date_key(items[i].date), i), reverse=True
    )


def bm25_scores(
    query: str, docs: Sequence[str], k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25
) -> list[float]:
    """Okapi BM25 score of every document for the query (whitespace tokens)."""
    toks = [d.split() for d in docs]
    n_docs = len(toks)
    if n_docs == 0:
        return []
    avgdl = sum(len(t) for t in toks) / n_docs
    df = Counter(w for t in toks for w in set(t))
    idf = {w: math.log(n_docs - n + 0.5) - math.log(n + 0.5) for w, n in df.items()}
    floor = epsilon * sum(idf.values()) / len(idf) if idf else 0.0
    idf = {w: (floor if v < 0 else v) for w, v in idf.items()}
    tfs = [Counter(t) for t in toks]
    scores = []
    for t, tf in zip(toks, tfs):
        norm = k1 * (1 - b + b * len(t) / avgdl) if avgdl > 0 else k1
        scores.append(sum(idf.get(q, 0.0) * tf[q] * (k1 + 1) / (tf[q] + norm) for q in query.split()))
    return scores


def _top(scores: Sequence[float], k: int) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


class DenseEncoder:
    """A local transformers encoder: mean-pooled last hidden states, dot-product scores."""

    def __init__(self, path: str, device: str | torch.device = "cpu", batch_size: int = 32, max_length: int = 512):
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token or self.tok.unk_token
        self.model = AutoModel.from_pretrained(path, local_files_only=True, trust_remote_code=False).to(device).eval()
        self.device, self.batch_size, self.max_length = torch.device(device), batch_size, max_length

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tok(
                list(texts[i : i + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state.float()  # (B, T, H)
            mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))  # (B, H)
        return torch.cat(out) if out else torch.zeros(0)

    def scores(self, query: str, docs: Sequence[str]) -> list[float]:
        if not docs:
            return []
        q = self.encode([query])  # (1, H)
        d = self.encode(docs)  # (D, H)
        return (d @ q[0]).tolist()


def retrieve(
    task: lamp.Task | str,
    question: lamp.Question,
    k: int = 8,
    retriever: str = "recency",
    seed: int = 0,
    encoder: DenseEncoder | None = None,
) -> list[lamp.Item]:
    """The k profile items the retriever ranks first, best first (k ≤ 0: none)."""
    task = lamp.get_task(task) if isinstance(task, str) else task
    items = question.profile
    if k <= 0 or not items:
        return []
    if retriever == "recency":
        order = recency_order(items)[:k]
    elif retriever == "bm25":
        order = _top(
            bm25_scores(lamp.retrieval_query(task, question.input), [lamp.item_text(task, i) for i in items]), k
        )
    elif retriever == "random":
        order = random.Random(f"{seed}:{question.id}").sample(range(len(items)), min(k, len(items)))
    elif retriever == "dense":
        if encoder is None:
            raise ValueError("the dense retriever needs an encoder (--dense-model, a local transformers folder)")
        order = _top(
            encoder.scores(lamp.retrieval_query(task, question.input), [lamp.item_text(task, i) for i in items]), k
        )
    else:
        raise ValueError(f"unknown retriever {retriever!r}; expected one of {RETRIEVERS}")
    return [items[i] for i in order]
