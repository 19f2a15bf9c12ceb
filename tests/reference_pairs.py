"""Plain float64 NumPy references for the pair losses, written as loops.

Independent of margin_jax: distances by explicit differences, miners by
enumerating pairs and triplets one at a time. Slow on purpose; keep B small.
"""

from __future__ import annotations

import math

import numpy as np


def distance(u, v, metric: str) -> float:
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    if metric == "squared_l2":
        return float(np.sum((u - v) ** 2))
    if metric == "l2":
        return math.sqrt(float(np.sum((u - v) ** 2)))
    if metric == "cosine":
        nu, nv = max(np.linalg.norm(u), 1e-12), max(np.linalg.norm(v), 1e-12)
        return 1.0 - min(1.0, max(-1.0, float(u @ v) / (nu * nv)))
    raise ValueError(metric)


def distances(x, metric: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    b = len(x)
    out = np.zeros((b, b))
    for i in range(b):
        for j in range(b):
            out[i, j] = 0.0 if i == j else distance(x[i], x[j], metric)
    return out


def _keep(x, labels, where):
    x, labels = np.asarray(x, np.float64), np.asarray(labels)
    if where is None:
        return x, labels
    where = np.asarray(where, bool)
    return x[where], labels[where]


def _hinge(gap, margin, soft):
    if soft:
        return math.log1p(math.exp(gap)) if gap < 30 else gap
    return max(0.0, gap + margin)


def semi_hard_choices(x, labels, metric="squared_l2"):
    """{(a, p): D(a, n*)} for every positive pair whose anchor has a negative."""
    x, labels = np.asarray(x, np.float64), np.asarray(labels)
    d = distances(x, metric)
    b = len(x)
    out = {}
    for a in range(b):
        negatives = [n for n in range(b) if labels[n] != labels[a]]
        if not negatives:
            continue
        for p in range(b):
            if p == a or labels[p] != labels[a]:
                continue
            farther = [d[a, n] for n in negatives if d[a, n] > d[a, p]]
            if farther:
                out[(a, p)] = min(farther)  # semi-hard, or easy
            else:
                out[(a, p)] = max(d[a, n] for n in negatives)  # hard
    return out


def triplet_semi_hard(
    x, labels, *, margin=0.2, metric="squared_l2", soft=False, where=None
):
    x, labels = _keep(x, labels, where)
    d = distances(x, metric)
    choices = semi_hard_choices(x, labels, metric)
    if not choices:
        return 0.0
    total = sum(_hinge(d[a, p] - dn, margin, soft) for (a, p), dn in choices.items())
    return total / len(choices)


def batch_hard_choices(x, labels, metric="squared_l2"):
    """{a: (D(a, p*), D(a, n*))} for anchors with a positive and a negative."""
    x, labels = np.asarray(x, np.float64), np.asarray(labels)
    d = distances(x, metric)
    b = len(x)
    out = {}
    for a in range(b):
        pos = [d[a, p] for p in range(b) if p != a and labels[p] == labels[a]]
        neg = [d[a, n] for n in range(b) if labels[n] != labels[a]]
        if pos and neg:
            out[a] = (max(pos), min(neg))
    return out


def triplet_batch_hard(
    x, labels, *, margin=0.2, metric="squared_l2", soft=False, where=None
):
    x, labels = _keep(x, labels, where)
    choices = batch_hard_choices(x, labels, metric)
    if not choices:
        return 0.0
    total = sum(_hinge(dp - dn, margin, soft) for dp, dn in choices.values())
    return total / len(choices)


def all_triplets(labels):
    labels = np.asarray(labels)
    b = len(labels)
    out = []
    for a in range(b):
        for p in range(b):
            if p == a or labels[p] != labels[a]:
                continue
            for n in range(b):
                if labels[n] != labels[a]:
                    out.append((a, p, n))
    return out


def triplet_batch_all(
    x, labels, *, margin=0.2, metric="squared_l2", soft=False, where=None
):
    """Mean over triplets with positive loss (over all triplets when soft)."""
    x, labels = _keep(x, labels, where)
    d = distances(x, metric)
    losses = [
        _hinge(d[a, p] - d[a, n], margin, soft) for a, p, n in all_triplets(labels)
    ]
    if not soft:
        losses = [v for v in losses if v > 0]
    return sum(losses) / len(losses) if losses else 0.0


def triplet(x, labels, *, mining, **kwargs):
    fn = {
        "semi_hard": triplet_semi_hard,
        "batch_hard": triplet_batch_hard,
        "batch_all": triplet_batch_all,
    }[mining]
    return fn(x, labels, **kwargs)


def contrastive(x, labels, *, margin=1.0, metric="l2", where=None):
    x, labels = _keep(x, labels, where)
    b = len(x)
    terms = []
    for i in range(b):
        for j in range(i + 1, b):
            dij = distance(x[i], x[j], metric)
            if labels[i] == labels[j]:
                terms.append(dij**2)
            else:
                terms.append(max(0.0, margin - dij) ** 2)
    return sum(terms) / len(terms) if terms else 0.0


def npair(anchors, positives):
    a, p = np.asarray(anchors, np.float64), np.asarray(positives, np.float64)
    n = len(a)
    out = np.zeros(n)
    for i in range(n):
        s = [float(a[i] @ p[j]) for j in range(n)]
        top = max(s)
        out[i] = top + math.log(sum(math.exp(v - top) for v in s)) - s[i]
    return out


def center_loss(x, labels, centers):
    x, c = np.asarray(x, np.float64), np.asarray(centers, np.float64)
    return np.array(
        [0.5 * float(np.sum((x[i] - c[labels[i]]) ** 2)) for i in range(len(x))]
    )


def update_centers(centers, x, labels, alpha):
    """Δc_j = Σ_{i: y_i=j}(c_j - x_i) / (1 + n_j); c_j <- c_j - α·Δc_j."""
    c = np.array(centers, np.float64)
    x = np.asarray(x, np.float64)
    new = c.copy()
    for j in range(len(c)):
        members = [i for i in range(len(x)) if labels[i] == j]
        if not members:
            continue
        delta = np.zeros(c.shape[1])
        for i in members:
            delta += c[j] - x[i]
        delta /= 1 + len(members)
        new[j] = c[j] - alpha * delta
    return new
