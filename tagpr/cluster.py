"""Semantic clustering of free tag names into the primary tags (TagPR §3.2, exploratory → primary tags).

The distinct tag names an LLM emits while tagging freely are embedded and clustered by
k-means (k-means++ seeding; many restarts, the lowest inertia kept; seeded), and each
cluster is named after its most central member: the name nearest its centroid (ties: the
more frequent name). Names are clustered unweighted: weighting by how often a name was
emitted lets a frequent kind split into spelling variants while rare kinds merge (seen
on the simulated expert's tags); counts only name and rank the clusters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def kmeans(
    x: np.ndarray, k: int, weights: np.ndarray | None = None, restarts: int = 10, iters: int = 100, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, float]:
    """Weighted k-means. x (N, D), weights (N,) → (labels (N,), centroids (k, D), inertia)."""
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k = {k} clusters for {n} points")
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(restarts):
        # k-means++: each next centre drawn ∝ weight · squared distance to the nearest chosen one
        centres = [x[rng.choice(n, p=w / w.sum())]]
        for _ in range(1, k):
            d2 = np.min(((x[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)  # (N,)
            p = w * d2
            centres.append(x[rng.choice(n, p=p / p.sum())] if p.sum() > 0 else x[rng.choice(n)])
        c = np.asarray(centres)  # (k, D)
        for _ in range(iters):
            labels = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)  # (N,)
            new = c.copy()
            for j in range(k):
                m = labels == j
                if m.any():
                    new[j] = (w[m, None] * x[m]).sum(0) / w[m].sum()
            if np.allclose(new, c):
                break
            c = new
        labels = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        inertia = float((w * ((x - c[labels]) ** 2).sum(-1)).sum())
        if best is None or inertia < best[2] - 1e-12:
            best = (labels, c, inertia)
    return best


@dataclass
class TagCluster:
    name: str  # the most central member
    count: int  # emitted occurrences of all members
    members: dict[str, int]  # member name → occurrences, most frequent first


def cluster_tags(
    counts: dict[str, int], vectors: np.ndarray, k: int = 9, restarts: int = 50, seed: int = 0
) -> list[TagCluster]:
    """Free tag names (with counts) and their embeddings (rows in `counts` order) → k named clusters,
    most frequent first."""
    names = list(counts)
    w = np.asarray([counts[n] for n in names], dtype=np.float64)
    labels, c, _ = kmeans(vectors, min(k, len(names)), None, restarts, seed=seed)
    out = []
    for j in range(len(c)):
        idx = np.flatnonzero(labels == j)
        if not len(idx):
            continue
        d = ((vectors[idx] - c[j]) ** 2).sum(-1)
        centre = idx[min(range(len(idx)), key=lambda i: (round(float(d[i]), 9), -w[idx[i]], names[idx[i]]))]
        members = dict(sorted(((names[i], counts[names[i]]) for i in idx), key=lambda t: (-t[1], t[0])))
        out.append(TagCluster(names[centre], int(sum(members.values())), members))
    return sorted(out, key=lambda t: (-t.count, t.name))
