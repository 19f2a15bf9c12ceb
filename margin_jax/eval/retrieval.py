"""Retrieval metrics over a labelled set: Recall@K, precision@1, R-precision, MAP@R.

Every item is a query against all the others (leave-one-out), as in the
metric-learning benchmarks (CUB-200, Cars-196, SOP, In-Shop). Neighbours come
from `knn_search`, blockwise, so 100,000 x 512 embeddings fit in memory.

A *lone* query is one whose class has no other item: no neighbour can be
correct and R = 0. pytorch-metric-learning excludes lone queries from every
metric; so do all the metrics here (Recall@K included, so Recall@1 equals
precision@1), and the number excluded is returned.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from margin_jax.eval import _checks
from margin_jax.eval.knn import knn_search

__all__ = ["recall_at_k", "retrieval_metrics"]


def _prepare(embeddings, labels, fn):
    emb = _checks.embeddings_array(embeddings, "embeddings", fn, dtype=np.float32)
    if emb.shape[0] < 2:
        raise ValueError(
            f"{fn}: `embeddings` must hold at least 2 items (each item is a query "
            f"against the others); got shape {emb.shape}."
        )
    codes, counts = _checks.label_codes(
        labels, "labels", fn, n=emb.shape[0], ref="embeddings", ref_shape=emb.shape
    )
    return emb, codes, counts


def recall_at_k(
    embeddings,
    labels,
    *,
    ks: Sequence[int] = (1, 2, 4, 8),
    metric: str = "cosine",
    block_size: int | None = None,
    progress: bool = False,
) -> dict:
    """Recall@K: share of queries with a same-class item among their K nearest.

    Recall@K = (1 / |Q|) Σ_{q ∈ Q} [∃ j ≤ K: y_{n_j(q)} = y_q], where n_j(q)
    is the j-th nearest other item of q (the query itself excluded) and Q the
    non-lone queries. This is the "Recall@K" of Song et al. (2016), not the
    information-retrieval recall (share of relevant items retrieved).

    Neighbours: cosine similarity of L2-normalised embeddings by default
    (metric='euclidean' for raw squared L2); ties go to the lower index (see
    `knn_search`). Lone queries (classes of one item) are excluded, as
    pytorch-metric-learning excludes them from precision@1; Song et al.'s
    datasets have none.

    Args:
      embeddings: embeddings [N, D].
      labels: class labels [N] (any integer or string dtype).
      ks: the K values, each 1 <= K <= N - 1 (a larger K is an error: the
        gallery of each query has only N - 1 items).
      metric: 'cosine' or 'euclidean'.
      block_size: query rows per kNN step (memory O(block_size x N)).
      progress: tqdm progress bar for long searches, if tqdm is installed.

    Returns:
      dict with ``"recall@K"`` (float) for each K in `ks`, ``num_queries``
      (non-lone queries scored) and ``num_lone_queries``. Recalls are NaN when
      every query is lone.

    Example:
      >>> import numpy as np
      >>> x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
      >>> recall_at_k(x, np.array([0, 1, 1, 0]), ks=(1, 2))
      {'recall@1': 0.0, 'recall@2': 0.5, 'num_queries': 4, 'num_lone_queries': 0}

    References:
      Song et al., "Deep Metric Learning via Lifted Structured Feature
      Embedding", CVPR 2016, https://arxiv.org/abs/1511.06452.
    """
    fn = "recall_at_k"
    emb, codes, counts = _prepare(embeddings, labels, fn)
    ks = tuple(ks)
    n_gallery = emb.shape[0] - 1
    bad = [k for k in ks if not isinstance(k, int | np.integer) or not 1 <= k]
    if not ks or bad or max(ks) > n_gallery:
        raise ValueError(
            f"{fn}: every K in `ks` must be an integer in [1, {n_gallery}] (each "
            f"query's gallery is the other {n_gallery} items of `embeddings` "
            f"shape {emb.shape}); got ks={ks!r}."
        )
    _, idx = knn_search(
        emb, k=int(max(ks)), metric=metric, block_size=block_size, progress=progress
    )
    scored = counts[codes] > 1
    hits = codes[idx[scored]] == codes[scored, None]
    first_hit = np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, np.inf)
    out = {}
    for k in ks:
        out[f"recall@{k}"] = float(np.mean(first_hit <= k)) if scored.any() else np.nan
    out["num_queries"] = int(scored.sum())
    out["num_lone_queries"] = int((~scored).sum())
    return out


def retrieval_metrics(
    embeddings,
    labels,
    *,
    metric: str = "cosine",
    block_size: int | None = None,
    progress: bool = False,
) -> dict:
    """Precision@1, R-precision and MAP@R, as pytorch-metric-learning defines them.

    For a query q with R = (number of other items of its class) > 0 and
    rel_j = [y_{n_j(q)} = y_q] for its j-th nearest other item:

      precision@1  = rel_1
      R-precision  = (1 / R) Σ_{j ≤ R} rel_j
      AP@R         = (1 / R) Σ_{j ≤ R} rel_j · (Σ_{i ≤ j} rel_i) / j

    each averaged over queries (MAP@R is the mean AP@R). Lone queries (R = 0)
    are excluded. This is pytorch-metric-learning's AccuracyCalculator with
    k="max_bin_count", queries = references ("precision_at_1", "r_precision",
    "mean_average_precision_at_r"), and Musgrave et al.'s definitions.

    Neighbours: cosine similarity of L2-normalised embeddings by default
    (metric='euclidean' is pytorch-metric-learning's default L2 on raw
    embeddings); ties go to the lower index (PML: unspecified). The search
    keeps max R neighbours per query: memory O(N · max class size).

    Args:
      embeddings: embeddings [N, D].
      labels: class labels [N] (any integer or string dtype).
      metric: 'cosine' or 'euclidean'.
      block_size: query rows per kNN step (memory O(block_size x N)).
      progress: tqdm progress bar, if tqdm is installed.

    Returns:
      dict with ``precision_at_1``, ``r_precision``, ``map_at_r`` (floats;
      NaN, as PML, when every query is lone; 1.0 for a single class of 2+
      items), ``num_queries`` and ``num_lone_queries``.

    Example:
      >>> import numpy as np
      >>> x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.5, 0.5]])
      >>> out = retrieval_metrics(x, np.array([0, 0, 1, 1]))
      >>> out["precision_at_1"], out["map_at_r"]
      (0.75, 0.75)

    References:
      Musgrave et al., "A Metric Learning Reality Check", ECCV 2020,
      https://arxiv.org/abs/2003.08505; pytorch-metric-learning
      utils/accuracy_calculator.py.
    """
    fn = "retrieval_metrics"
    emb, codes, counts = _prepare(embeddings, labels, fn)
    r = counts[codes] - 1
    scored = r > 0
    out = {"precision_at_1": np.nan, "r_precision": np.nan, "map_at_r": np.nan}
    if scored.any():
        k = int(r.max())
        _, idx = knn_search(
            emb, k=k, metric=metric, block_size=block_size, progress=progress
        )
        r = r[scored]
        hits = codes[idx[scored]] == codes[scored, None]
        rel = hits & (np.arange(1, k + 1)[None, :] <= r[:, None])
        precision = np.cumsum(rel, axis=1) / np.arange(1, k + 1)
        out["precision_at_1"] = float(np.mean(hits[:, 0]))
        out["r_precision"] = float(np.mean(rel.sum(axis=1) / r))
        out["map_at_r"] = float(np.mean(np.sum(precision * rel, axis=1) / r))
    out["num_queries"] = int(scored.sum())
    out["num_lone_queries"] = int((~scored).sum())
    return out
