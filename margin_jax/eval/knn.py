"""Exact k-nearest-neighbour search, blockwise in JAX.

The queries are processed in blocks of `block_size` rows against the whole
gallery: one jitted step computes the [block, N] score block and keeps its top
k with `lax.top_k`, so memory is O(block_size x N) and the N x N matrix is
never formed. For 100,000 x 512 embeddings the default block is 671 rows
(~256 MiB of float32 scores); the N² D multiply-adds dominate: about 40 s on
two idle CPU cores, 100-125 s on two cores shared with other jobs
(benchmarks/eval.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from margin_jax.eval import _checks

__all__ = ["knn_search"]

_METRICS = ("cosine", "euclidean")
_BLOCK_BYTES = 256 * 2**20


@functools.partial(jax.jit, static_argnames=("block", "k", "metric", "exclude_self"))
def _block_top_k(
    queries, gallery, gallery_sq, start, *, block, k, metric, exclude_self
):
    q = lax.dynamic_slice_in_dim(queries, start, block, axis=0)
    dots = lax.dot_general(
        q, gallery, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST
    )
    if metric == "euclidean":
        q_sq = jnp.sum(q * q, axis=1)
        # Nearest = largest -d²; rounding can make d² slightly negative.
        scores = jnp.minimum(2 * dots - q_sq[:, None] - gallery_sq[None, :], 0.0)
    else:
        scores = dots
    # top_k orders -0.0 below +0.0; make them one value so ties break by index.
    scores = jnp.where(scores == 0, jnp.zeros_like(scores), scores)
    if exclude_self:
        rows = start + jnp.arange(block)
        cols = jnp.arange(gallery.shape[0])
        scores = jnp.where(rows[:, None] == cols[None, :], -jnp.inf, scores)
    return lax.top_k(scores, k)


def _default_block(n_queries: int, n_gallery: int) -> int:
    return int(max(1, min(n_queries, 4096, _BLOCK_BYTES // (4 * n_gallery))))


def _progress(iterable, total, enabled):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the progress bar is a nicety, not a dependency
        return iterable
    return tqdm(iterable, total=total, desc="knn_search", unit="block")


def knn_search(
    queries,
    gallery=None,
    *,
    k: int,
    metric: str = "cosine",
    block_size: int | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest gallery items of each query, blockwise (never N x N).

    metric='cosine': score = x̂_q · x̂_g (both L2-normalised), nearest =
    highest. metric='euclidean': d² = ||x_q - x_g||² on the raw embeddings,
    nearest = smallest (computed as ||q||² + ||g||² - 2 q·g, clipped at 0).
    With `gallery` None the queries are searched against themselves and each
    query's own row is excluded (by index, so an identical duplicate elsewhere
    still counts as a neighbour).

    Ties are broken by the lower gallery index (lax.top_k is stable; -0.0 and
    +0.0 are made equal first). pytorch-metric-learning's torch.topk leaves
    the order of ties unspecified, and faiss has its own; results can differ
    only on exact ties.

    Args:
      queries: embeddings [Nq, D].
      gallery: embeddings [Ng, D], or None for a self-search of `queries`.
      k: neighbours per query, 1 <= k <= Ng (Ng - 1 for a self-search).
      metric: 'cosine' or 'euclidean'.
      block_size: query rows per step; the default keeps one [block, Ng]
        float32 score block near 256 MiB.
      progress: show a tqdm progress bar when tqdm is installed.

    Returns:
      (scores, indices), NumPy arrays [Nq, k], nearest first: cosine
      similarities (descending) or squared L2 distances (ascending), and int32
      gallery row indices.

    Example:
      >>> import numpy as np
      >>> x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
      >>> scores, idx = knn_search(x, k=2)
      >>> idx.tolist()
      [[1, 2], [0, 2], [1, 0], [2, 1]]

    References:
      Johnson et al., "Billion-scale similarity search with GPUs" (faiss),
      2017, https://arxiv.org/abs/1702.08734 (the exact flat index this matches).
    """
    fn = "knn_search"
    if metric not in _METRICS:
        raise ValueError(f"{fn}: `metric` must be one of {_METRICS}, got {metric!r}.")
    q = _checks.embeddings_array(queries, "queries", fn, dtype=np.float32)
    exclude_self = gallery is None
    g = q if exclude_self else _checks.embeddings_array(gallery, "gallery", fn)
    g = g.astype(np.float32, copy=False)
    if g.shape[1] != q.shape[1]:
        raise ValueError(
            f"{fn}: `queries` and `gallery` must have the same dimension D; got "
            f"`queries` shape {q.shape} and `gallery` shape {g.shape}."
        )
    available = g.shape[0] - int(exclude_self)
    if not isinstance(k, int | np.integer) or not 1 <= k <= available:
        what = "other items (the query itself is excluded)" if exclude_self else "items"
        raise ValueError(
            f"{fn}: `k` must be an integer in [1, {available}]: the gallery has "
            f"{available} {what}; got k={k!r} for `queries` shape {q.shape}."
        )
    block = _default_block(q.shape[0], g.shape[0]) if block_size is None else block_size
    if not isinstance(block, int | np.integer) or block < 1:
        raise ValueError(
            f"{fn}: `block_size` must be a positive integer, got {block!r}."
        )
    block = int(min(block, q.shape[0]))

    q_dev = jnp.asarray(q)
    if metric == "cosine":
        q_dev = q_dev / jnp.maximum(
            jnp.linalg.norm(q_dev, axis=1, keepdims=True), 1e-12
        )
    if exclude_self:
        g_dev = q_dev
    else:
        g_dev = jnp.asarray(g)
        if metric == "cosine":
            norms = jnp.linalg.norm(g_dev, axis=1, keepdims=True)
            g_dev = g_dev / jnp.maximum(norms, 1e-12)
    g_sq = jnp.sum(g_dev * g_dev, axis=1)

    n = q.shape[0]
    starts = list(range(0, n, block))
    scores = np.empty((n, int(k)), np.float32)
    indices = np.empty((n, int(k)), np.int32)
    for start in _progress(starts, len(starts), progress):
        # The last block is shifted back to end at n (overlapping the previous
        # one) so every step has the same shape and compiles once.
        s = min(start, n - block)
        vals, idx = _block_top_k(
            q_dev,
            g_dev,
            g_sq,
            s,
            block=block,
            k=int(k),
            metric=metric,
            exclude_self=exclude_self,
        )
        scores[s : s + block] = np.asarray(vals)
        indices[s : s + block] = np.asarray(idx)
    if metric == "euclidean":
        scores = 0.0 - scores  # not -scores, which would turn 0.0 into -0.0
    return scores, indices
