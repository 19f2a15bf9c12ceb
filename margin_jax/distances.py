"""Distances and pair masks of a batch of embeddings: the pair losses' first stage.

    distances D [B, B] -> positive / negative masks -> miner -> hinge -> mean

`pairwise_distances`, `positive_mask` and `negative_mask` are the public stages
on one batch. `distances_to_batch` is the form the mined losses use: the
distances and masks of the local anchors against the global batch of
``axis_name`` (gathered with `margin_jax.collective.gather`), so a device
computes only its own anchors' rows of the global [n·B, n·B] matrices.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from margin_jax import _checks, collective
from margin_jax.batch import check_choice, prepare_embeddings, valid_rows
from margin_jax.cosine import l2_normalize

__all__ = [
    "METRICS",
    "pairwise_distances",
    "positive_mask",
    "negative_mask",
    "cross_distances",
    "pair_masks",
    "label_masks",
    "distances_to_batch",
]

METRICS = ("squared_l2", "l2", "cosine")

_HIGHEST = lax.Precision.HIGHEST


def _safe_sqrt(x: jax.Array) -> jax.Array:
    # Double where: the unselected branch sees 1, so d sqrt at 0 is 0, not inf/NaN.
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def cross_distances(x: jax.Array, y: jax.Array, metric: str) -> jax.Array:
    """D(x_i, y_j) for x [b, D] and y [B, D] -> [b, B] (self pairs not zeroed).

    The formulas of `pairwise_distances`; ``metric`` is not checked here.
    """
    if metric == "cosine":
        cos = jnp.matmul(l2_normalize(x), l2_normalize(y).T, precision=_HIGHEST)
        return 1.0 - jnp.clip(cos, -1.0, 1.0)
    gram = jnp.matmul(x, y.T, precision=_HIGHEST)
    sq = jnp.sum(x * x, -1)[:, None] + jnp.sum(y * y, -1)[None, :] - 2.0 * gram
    sq = jnp.maximum(sq, 0.0)
    return _safe_sqrt(sq) if metric == "l2" else sq


def pair_masks(labels_a, valid_a, labels, valid, offset) -> tuple[jax.Array, jax.Array]:
    """Positive and negative masks [b, B] of b local anchors against a batch of B.

    ``offset`` is the global index of the first local anchor (see
    `margin_jax.collective.axis_offset`), so the anchor itself is never its own
    positive. Labels are integers: the masks carry no gradient.
    """
    same = labels_a[:, None] == labels[None, :]
    both = valid_a[:, None] & valid[None, :]
    rows = offset + jnp.arange(labels_a.shape[0])
    not_self = rows[:, None] != jnp.arange(labels.shape[0])[None, :]
    return same & not_self & both, ~same & both


def distances_to_batch(embeddings, labels, where, *, metric: str, axis_name=None):
    """Distances [b, B] of the local anchors to the global batch, and its masks.

    The embeddings are promoted to the compute dtype with padded rows zeroed,
    then gathered over ``axis_name`` (B = n·b; B = b for None). Call inside
    jit after the argument checks.

    Returns:
      ``(d, pos, neg, dtype)``: float [b, B] distances, bool [b, B] positive and
      negative masks (`pair_masks`), and the compute dtype.
    """
    dtype = _checks.compute_dtype(embeddings)
    x, valid = prepare_embeddings(embeddings, where, dtype)
    labels = jnp.asarray(labels)
    xs, ls, vs = (collective.gather(a, axis_name) for a in (x, labels, valid))
    d = cross_distances(x, xs, metric)
    offset = collective.axis_offset(x.shape[0], axis_name)
    pos, neg = pair_masks(labels, valid, ls, vs, offset)
    return d, pos, neg, dtype


def label_masks(labels, where, fn: str) -> tuple[jax.Array, jax.Array]:
    """Checked positive and negative masks [B, B] of one batch of labels."""
    _checks.check_rank(labels, 1, "labels", fn, "[B]")
    labels = jnp.asarray(labels)
    _checks.check_labels(
        labels, labels.shape[0], fn, ref="labels", ref_shape=labels.shape
    )
    _checks.check_where(
        where, labels.shape[0], fn, ref="labels", ref_shape=labels.shape
    )
    return _masks_core(labels, where)


@jax.jit
def _masks_core(labels, where):
    valid = valid_rows(where, labels.shape[0])
    return pair_masks(labels, valid, labels, valid, 0)


# --------------------------------------------------------------------------------
# The public stages.


def pairwise_distances(
    embeddings: ArrayLike, *, metric: str = "squared_l2"
) -> jax.Array:
    """Pairwise distance matrix of a batch of embeddings.

    ``squared_l2``: D_ij = ||x_i - x_j||², computed as ||x_i||² + ||x_j||² -
    2 x_i·x_j and clipped at 0. ``l2``: D_ij = sqrt of that, with a safe square
    root whose gradient at zero distance is 0 (not NaN). ``cosine``: D_ij = 1 -
    x̂_i·x̂_j with x̂ = `l2_normalize`(x) and the cosine clipped to [-1, 1], so D
    is in [0, 2]. The diagonal is exactly 0 and has no gradient.

    Args:
      embeddings: float array [B, D].
      metric: one of ``'squared_l2'``, ``'l2'``, ``'cosine'`` (static).

    Returns:
      Distances [B, B] in float32 or wider (bf16/fp16 inputs are promoted).

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax.distances import pairwise_distances
      >>> x = jnp.array([[0.0, 0.0], [3.0, 4.0]])
      >>> pairwise_distances(x, metric="l2").tolist()
      [[0.0, 5.0], [5.0, 0.0]]

    References:
      Schroff et al., FaceNet, CVPR 2015, https://arxiv.org/abs/1503.03832
      (squared L2 on normalised embeddings).

    Differs: tensorflow-addons' ``'L_2'`` is the squared distance and its
    ``'angular'`` is our ``'cosine'``; pytorch-metric-learning's default
    ``LpDistance`` is the (non-squared) L2 of L2-normalised embeddings, which here
    is ``metric='l2'`` after normalising yourself.
    """
    fn = "pairwise_distances"
    _checks.check_rank(embeddings, 2, "embeddings", fn, "[B, D]")
    _checks.check_floating(embeddings, "embeddings", fn)
    check_choice(metric, "metric", METRICS, fn)
    return _pairwise_core(embeddings, metric=metric)


# The public functions check their arguments (trace-time Python), then call a
# jitted core, so eager calls run as one compiled computation.


@functools.partial(jax.jit, static_argnames=("metric",))
def _pairwise_core(embeddings, *, metric):
    x = jnp.asarray(embeddings, dtype=_checks.compute_dtype(embeddings))
    d = cross_distances(x, x, metric)
    return jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, d)


def positive_mask(labels: ArrayLike, *, where: ArrayLike | None = None) -> jax.Array:
    """Mask of positive pairs: same label, different rows, both rows valid.

    P_ij = [y_i = y_j] ∧ [i ≠ j] ∧ where_i ∧ where_j.

    Args:
      labels: integer array [B].
      where: optional bool [B]; False rows are in no pair.

    Returns:
      Bool array [B, B].

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax.distances import positive_mask
      >>> positive_mask(jnp.array([0, 0, 1])).astype(int).tolist()
      [[0, 1, 0], [1, 0, 0], [0, 0, 0]]

    References:
      Hermans et al., In Defense of the Triplet Loss, 2017,
      https://arxiv.org/abs/1703.07737

    Differs: tensorflow-addons builds the same mask as adjacency minus the
    identity; it has no ``where``.
    """
    return label_masks(labels, where, "positive_mask")[0]


def negative_mask(labels: ArrayLike, *, where: ArrayLike | None = None) -> jax.Array:
    """Mask of negative pairs: different labels, both rows valid.

    N_ij = [y_i ≠ y_j] ∧ where_i ∧ where_j.

    Args:
      labels: integer array [B].
      where: optional bool [B]; False rows are in no pair.

    Returns:
      Bool array [B, B].

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax.distances import negative_mask
      >>> negative_mask(jnp.array([0, 0, 1])).astype(int).tolist()
      [[0, 0, 1], [0, 0, 1], [1, 1, 0]]

    References:
      Hermans et al., In Defense of the Triplet Loss, 2017,
      https://arxiv.org/abs/1703.07737

    Differs: same as tensorflow-addons' ``adjacency_not``, plus ``where``.
    """
    return label_masks(labels, where, "negative_mask")[1]
