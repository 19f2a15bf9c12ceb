"""Distances, miners and pair losses: triplet, contrastive, n-pair.

Every function here works on a batch of embeddings ``[B, D]`` and integer labels
``[B]``. The pair and triplet losses are batch statistics, so unlike the
per-example margin-softmax losses they return a scalar (the mean over the pairs or
triplets they select). The pipeline is

    distances D [B, B] -> positive / negative masks -> miner -> hinge -> mean

and each stage is a public function. Padded rows (``where=False``) are removed
exactly: they are neither anchors, positives nor negatives and get no gradient,
so ``loss(x, y, where=m) == loss(x[m], y[m])``.

Multi-device batches: the mined losses take ``axis_name``. Inside ``jax.pmap`` or
``jax.shard_map`` each device gathers the embeddings, labels and masks of the
named axis, computes the terms of its own anchors against the global batch, and
the partial sums and counts are summed over the axis. The value on every device
and the gradient with respect to each device's embeddings equal the
single-device value and gradient on the concatenated batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from margin_jax import _checks
from margin_jax.cosine import l2_normalize

__all__ = [
    "METRICS",
    "MININGS",
    "pairwise_distances",
    "positive_mask",
    "negative_mask",
    "mine_semi_hard",
    "mine_batch_hard",
    "mine_batch_all",
    "triplet_loss",
    "triplet_loss_with_stats",
    "contrastive_loss",
    "npair_loss",
    "two_head_loss",
]

METRICS = ("squared_l2", "l2", "cosine")
MININGS = ("semi_hard", "batch_hard", "batch_all")

_HIGHEST = lax.Precision.HIGHEST


# --------------------------------------------------------------------------------
# Private helpers.


def _check_choice(value, name: str, choices: tuple, fn: str) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"{fn}: `{name}` must be one of {', '.join(map(repr, choices))}; "
            f"got {value!r}."
        )


def _check_batch(embeddings, labels, where, fn: str) -> None:
    """Float embeddings [B, D], integer labels [B], optional bool where [B]."""
    _checks.check_rank(embeddings, 2, "embeddings", fn, "[B, D]")
    _checks.check_floating(embeddings, "embeddings", fn)
    shape = tuple(jnp.shape(embeddings))
    _checks.check_labels(labels, shape[0], fn, ref="embeddings", ref_shape=shape)
    _checks.check_where(where, shape[0], fn, ref="embeddings", ref_shape=shape)


def _check_distances(distances, labels, where, fn: str) -> None:
    _checks.check_rank(distances, 2, "distances", fn, "[B, B]")
    _checks.check_floating(distances, "distances", fn)
    shape = tuple(jnp.shape(distances))
    if shape[0] != shape[1]:
        raise ValueError(f"{fn}: `distances` must be square [B, B]; got shape {shape}.")
    _checks.check_labels(labels, shape[0], fn, ref="distances", ref_shape=shape)
    _checks.check_where(where, shape[0], fn, ref="distances", ref_shape=shape)


def _label_masks(labels, where, fn: str):
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
    valid = _valid(where, labels.shape[0])
    return _pair_masks(labels, valid, labels, valid, 0)


def _check_labels_in_range(
    labels, where, num_classes: int, fn: str, ref: str, ref_shape
) -> None:
    """Range check of the labels of valid rows only (eager calls), so a padding
    label such as -1 under ``where=False`` is allowed. Call after the dtype,
    shape and ``where`` checks."""
    if not (_checks.is_concrete(labels) and _checks.is_concrete(where)):
        return
    labels = np.asarray(labels)
    if where is not None:
        labels = np.where(np.asarray(where), labels, 0)
    _checks.check_labels(
        labels,
        labels.shape[0],
        fn,
        num_classes=num_classes,
        ref=ref,
        ref_shape=ref_shape,
    )


def _valid(where, batch: int) -> jax.Array:
    if where is None:
        return jnp.ones((batch,), dtype=bool)
    return jnp.asarray(where, dtype=bool)


def _prepare(embeddings, where, dtype):
    """Promoted embeddings with padded rows zeroed (so garbage there never leaks
    into a gradient: the double-where rule), and the validity mask."""
    x = jnp.asarray(embeddings, dtype=dtype)
    valid = _valid(where, x.shape[0])
    return jnp.where(valid[:, None], x, 0.0), valid


def _safe_sqrt(x: jax.Array) -> jax.Array:
    # Double where: the unselected branch sees 1, so d sqrt at 0 is 0, not inf/NaN.
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _cross_distances(x: jax.Array, y: jax.Array, metric: str) -> jax.Array:
    """D(x_i, y_j) for x [b, D] and y [B, D] -> [b, B] (self pairs not zeroed)."""
    if metric == "cosine":
        cos = jnp.matmul(l2_normalize(x), l2_normalize(y).T, precision=_HIGHEST)
        return 1.0 - jnp.clip(cos, -1.0, 1.0)
    gram = jnp.matmul(x, y.T, precision=_HIGHEST)
    sq = jnp.sum(x * x, -1)[:, None] + jnp.sum(y * y, -1)[None, :] - 2.0 * gram
    sq = jnp.maximum(sq, 0.0)
    return _safe_sqrt(sq) if metric == "l2" else sq


def _pair_masks(labels_a, valid_a, labels, valid, offset):
    """Positive and negative masks [b, B] of local anchors against the batch.

    ``offset`` is the global index of the first local anchor, so the anchor itself
    is never its own positive. Labels are integers: the masks carry no gradient.
    """
    same = labels_a[:, None] == labels[None, :]
    both = valid_a[:, None] & valid[None, :]
    rows = offset + jnp.arange(labels_a.shape[0])
    not_self = rows[:, None] != jnp.arange(labels.shape[0])[None, :]
    return same & not_self & both, ~same & both


def _gather(x: jax.Array, axis_name) -> jax.Array:
    if axis_name is None:
        return x
    return lax.all_gather(x, axis_name, axis=0, tiled=True)


def _offset(batch: int, axis_name):
    if axis_name is None:
        return 0
    return lax.axis_index(axis_name) * batch


def _psum(x, axis_name):
    """Sum over the axis of a quantity that carries no gradient (a count)."""
    return x if axis_name is None else lax.psum(x, axis_name)


def _varying_axes(x) -> frozenset:
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    if mat is not None:
        return frozenset(getattr(mat, "varying", ()))
    return frozenset(getattr(aval, "vma", ()))


def _global_sum(partial: jax.Array, axis_name) -> jax.Array:
    """Differentiable sum of per-device partial sums, equal on every device.

    The gradient must be that of the single-device loss, not the device count
    times it. Under ``shard_map`` with ``check_vma=True`` the partial is typed as
    varying and ``psum`` transposes to a broadcast: plain ``psum`` is right. Under
    ``pmap`` (and ``check_vma=False``) ``psum`` transposes to another ``psum``,
    which would multiply the gradient by the axis size; there the gradient flows
    through the local partial only, and ``all_gather``'s transpose (a sum over
    devices) adds the other devices' terms.
    """
    if axis_name is None:
        return partial
    total = lax.psum(partial, axis_name)
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    if all(name in _varying_axes(partial) for name in names):
        return total
    return partial + lax.stop_gradient(total - partial)


def _local_vs_global(embeddings, labels, where, metric, axis_name):
    """Distances [b, B] of the local anchors to the (gathered) batch, and masks."""
    dtype = _checks.compute_dtype(embeddings)
    x, valid = _prepare(embeddings, where, dtype)
    labels = jnp.asarray(labels)
    xs, ls, vs = (_gather(a, axis_name) for a in (x, labels, valid))
    d = _cross_distances(x, xs, metric)
    pos, neg = _pair_masks(labels, valid, ls, vs, _offset(x.shape[0], axis_name))
    return d, pos, neg, dtype


# --------------------------------------------------------------------------------
# Distances and masks.


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
      >>> from margin_jax.pairs import pairwise_distances
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
    _check_choice(metric, "metric", METRICS, fn)
    return _pairwise_core(embeddings, metric=metric)


# The public functions check their arguments (trace-time Python), then call a
# jitted core, so eager calls run as one compiled computation.


@functools.partial(jax.jit, static_argnames=("metric",))
def _pairwise_core(embeddings, *, metric):
    x = jnp.asarray(embeddings, dtype=_checks.compute_dtype(embeddings))
    d = _cross_distances(x, x, metric)
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
      >>> from margin_jax.pairs import positive_mask
      >>> positive_mask(jnp.array([0, 0, 1])).astype(int).tolist()
      [[0, 1, 0], [1, 0, 0], [0, 0, 0]]

    References:
      Hermans et al., In Defense of the Triplet Loss, 2017,
      https://arxiv.org/abs/1703.07737

    Differs: tensorflow-addons builds the same mask as adjacency minus the
    identity; it has no ``where``.
    """
    return _label_masks(labels, where, "positive_mask")[0]


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
      >>> from margin_jax.pairs import negative_mask
      >>> negative_mask(jnp.array([0, 0, 1])).astype(int).tolist()
      [[0, 0, 1], [0, 0, 1], [1, 1, 0]]

    References:
      Hermans et al., In Defense of the Triplet Loss, 2017,
      https://arxiv.org/abs/1703.07737

    Differs: same as tensorflow-addons' ``adjacency_not``, plus ``where``.
    """
    return _label_masks(labels, where, "negative_mask")[1]


# --------------------------------------------------------------------------------
# Miners. The private versions take [b, B] distances of local anchors against the
# batch; they never differentiate (the caller passes stop-gradient distances).


def _sortable_key(x: jax.Array) -> jax.Array:
    """Integers that sort like the floats ``x`` (NaN aside).

    Integer sorts are several times faster than float sorts on CPU. Non-negative
    floats' bits already sort as integers; negative ones get their magnitude bits
    flipped. -0.0 is mapped to +0.0 first so that equal floats give equal keys.
    """
    itype = jnp.int64 if x.dtype.itemsize == 8 else jnp.int32
    bits = lax.bitcast_convert_type(jnp.where(x == 0, jnp.zeros_like(x), x), itype)
    return jnp.where(bits < 0, bits ^ jnp.iinfo(itype).max, bits)


def _semi_hard(dist, pos, neg):
    b, n = dist.shape
    key = _sortable_key(dist)
    neg_key = jnp.where(neg, key, jnp.iinfo(key.dtype).max)
    sorted_key = jnp.sort(neg_key, axis=1)
    num_neg = jnp.sum(neg, axis=1, keepdims=True)
    # One binary search per row answers two questions (integer keys, so the
    # leftmost position of v is the rightmost position of v - 1):
    # the rank of the first negative strictly farther than each positive, and
    # the rank at which each negative sits (ties: any one of equal distance).
    search = jax.vmap(functools.partial(jnp.searchsorted, side="right"))
    ranks = search(sorted_key, jnp.concatenate([key, neg_key - 1], axis=1))
    rank, neg_rank = ranks[:, :n], ranks[:, n:]
    iota = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    order = jnp.zeros((b, n), jnp.int32).at[jnp.arange(b)[:, None], neg_rank].set(iota)
    semi = jnp.take_along_axis(order, jnp.minimum(rank, n - 1), axis=1)
    # None farther: the farthest negative (semi-hard -> easy -> hard).
    farthest = jnp.argmax(jnp.where(neg, dist, -jnp.inf), axis=1)[:, None]
    return jnp.where(rank < num_neg, semi, farthest), pos & (num_neg > 0)


def _batch_hard(dist, pos, neg):
    p_idx = jnp.argmax(jnp.where(pos, dist, -jnp.inf), axis=1)
    n_idx = jnp.argmin(jnp.where(neg, dist, jnp.inf), axis=1)
    return p_idx, n_idx, jnp.any(pos, axis=1) & jnp.any(neg, axis=1)


def mine_semi_hard(
    distances: ArrayLike, labels: ArrayLike, *, where: ArrayLike | None = None
) -> tuple[jax.Array, jax.Array]:
    """Semi-hard negative of every positive pair (FaceNet, as tensorflow-addons).

    For each ordered positive pair (a, p), a ≠ p: the closest negative with
    D(a, n) > D(a, p) (strict); if there is none, the farthest negative of the
    anchor. That is the priority semi-hard -> easy -> hard of Taha et al. The
    choice does not depend on the margin. Computed with one sort per anchor,
    O(B² log B), never a [B, B, B] tensor. Among equally distant negatives the
    choice is arbitrary (the loss does not depend on it).

    Args:
      distances: float [B, B] (no gradient flows through the choice).
      labels: integer [B].
      where: optional bool [B]; False rows are in no pair.

    Returns:
      ``(negatives, valid)``: int32 [B, B], the chosen negative's index for pair
      (a, p); bool [B, B], True where (a, p) is a positive pair and a has at least
      one negative (elsewhere ``negatives`` is meaningless).

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax.pairs import mine_semi_hard, pairwise_distances
      >>> x = jnp.array([[0.0], [1.0], [0.5], [3.0]])
      >>> neg, valid = mine_semi_hard(pairwise_distances(x), jnp.array([0, 0, 1, 1]))
      >>> int(neg[0, 1]), bool(valid[0, 1])  # D(0,1)=1; D(0,2)=0.25, D(0,3)=9
      (3, True)

    References:
      Schroff et al., FaceNet, CVPR 2015, https://arxiv.org/abs/1503.03832;
      tensorflow-addons ``triplet_semihard_loss``; Taha et al., Boosting Standard
      Classification Architectures Through a Ranking Regularizer, WACV 2020,
      https://arxiv.org/abs/1901.08616

    Differs: pytorch-metric-learning's ``TripletMarginMiner('semihard')`` keeps
    every triplet with D(a,p) < D(a,n) < D(a,p) + margin instead of one negative
    per pair. When an anchor has no negative at all, tensorflow-addons uses the
    row minimum (the anchor itself) as the "negative"; here the pair is invalid.
    """
    _check_distances(distances, labels, where, "mine_semi_hard")
    return _mine_core(distances, labels, where, mining="semi_hard")


def mine_batch_hard(
    distances: ArrayLike, labels: ArrayLike, *, where: ArrayLike | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Hardest positive and hardest negative of every anchor (Hermans et al.).

    p*(a) = argmax_{p: y_p = y_a, p ≠ a} D(a, p), n*(a) = argmin_{n: y_n ≠ y_a}
    D(a, n).

    Args:
      distances: float [B, B] (no gradient flows through the choice).
      labels: integer [B].
      where: optional bool [B]; False rows are in no pair.

    Returns:
      ``(positives, negatives, valid)``: int32 [B], int32 [B], and bool [B] True
      for anchors with at least one positive and one negative (anchors without
      are excluded from the loss).

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax.pairs import mine_batch_hard, pairwise_distances
      >>> x = jnp.array([[0.0], [1.0], [2.0], [0.5]])
      >>> p, n, ok = mine_batch_hard(pairwise_distances(x), jnp.array([0, 0, 0, 1]))
      >>> int(p[0]), int(n[0]), ok.tolist()
      (2, 3, [True, True, True, False])

    References:
      Hermans, Beyer, Leibe, In Defense of the Triplet Loss for Person
      Re-Identification, 2017, https://arxiv.org/abs/1703.07737

    Differs: tensorflow-addons ``triplet_hard_loss`` keeps anchors with no
    positive (their "hardest positive" is the row minimum) in the mean.
    """
    _check_distances(distances, labels, where, "mine_batch_hard")
    return _mine_core(distances, labels, where, mining="batch_hard")


@functools.partial(jax.jit, static_argnames=("mining",))
def _mine_core(distances, labels, where, *, mining):
    pos, neg = _masks_core(labels, where)
    dtype = _checks.compute_dtype(distances)
    dist = lax.stop_gradient(jnp.asarray(distances, dtype))
    if mining == "semi_hard":
        idx, ok = _semi_hard(dist, pos, neg)
        return idx.astype(jnp.int32), ok
    p, n, ok = _batch_hard(dist, pos, neg)
    return p.astype(jnp.int32), n.astype(jnp.int32), ok


def mine_batch_all(labels: ArrayLike, *, where: ArrayLike | None = None) -> jax.Array:
    """Every valid triplet: mask [a, p, n] = P_ap ∧ N_an.

    Args:
      labels: integer [B].
      where: optional bool [B]; False rows are in no triplet.

    Returns:
      Bool [B, B, B] (memory grows as B³).

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax.pairs import mine_batch_all
      >>> int(mine_batch_all(jnp.array([0, 0, 1])).sum())  # (0,1,2) and (1,0,2)
      2

    References:
      Hermans et al., In Defense of the Triplet Loss, 2017,
      https://arxiv.org/abs/1703.07737

    Differs: pytorch-metric-learning returns index lists, not a mask.
    """
    pos, neg = _label_masks(labels, where, "mine_batch_all")
    return pos[:, :, None] & neg[:, None, :]


# --------------------------------------------------------------------------------
# Triplet loss.


def _hinge(gap: jax.Array, margin, soft: bool) -> jax.Array:
    return jax.nn.softplus(gap) if soft else jax.nn.relu(gap + margin)


def _triplet_terms(d, pos, neg, *, margin, mining, soft):
    """Loss terms of the local anchors and which of them are valid."""
    dist = lax.stop_gradient(d)
    if mining == "semi_hard":
        idx, valid = _semi_hard(dist, pos, neg)
        return _hinge(d - jnp.take_along_axis(d, idx, axis=1), margin, soft), valid
    if mining == "batch_hard":
        p, n, valid = _batch_hard(dist, pos, neg)
        d_ap = jnp.take_along_axis(d, p[:, None], axis=1)[:, 0]
        d_an = jnp.take_along_axis(d, n[:, None], axis=1)[:, 0]
        return _hinge(d_ap - d_an, margin, soft), valid
    valid = pos[:, :, None] & neg[:, None, :]
    return _hinge(d[:, :, None] - d[:, None, :], margin, soft), valid


def triplet_loss_with_stats(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    margin: ArrayLike = 0.2,
    mining: str = "semi_hard",
    metric: str = "squared_l2",
    soft: bool = False,
    where: ArrayLike | None = None,
    axis_name=None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`triplet_loss` and a dict of counts that flags batches with nothing to learn.

    Args:
      embeddings, labels, margin, mining, metric, soft, where, axis_name: as
        `triplet_loss`.

    Returns:
      ``(loss, stats)``: the scalar loss and a dict of scalars, identical on every
      device of ``axis_name``:

      * ``num_positive_pairs`` (int32): ordered positive pairs (a, p), a ≠ p.
      * ``num_terms`` (int32): terms the miner produced (semi-hard: positive pairs
        whose anchor has a negative; batch-hard: anchors with a positive and a
        negative; batch-all: valid triplets).
      * ``num_active`` (int32): terms with loss > 0.
      * ``fraction_active`` (float): ``num_active / max(num_terms, 1)``.
      * ``valid`` (bool): ``num_terms > 0``. False means the batch has no usable
        positive pair (e.g. every class a singleton) and the loss is exactly 0.

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax.pairs import triplet_loss_with_stats
      >>> x = jnp.array([[0.0], [1.0], [0.5], [3.0]])
      >>> loss, stats = triplet_loss_with_stats(x, jnp.array([0, 1, 2, 3]))
      >>> float(loss), bool(stats["valid"])  # all singletons: nothing to learn
      (0.0, False)

    References:
      See `triplet_loss`.

    Differs: tensorflow-addons returns NaN (0/0) for a batch without positive
    pairs and reports no counts.
    """
    fn = "triplet_loss"
    _check_batch(embeddings, labels, where, fn)
    _check_choice(mining, "mining", MININGS, fn)
    if not isinstance(soft, bool):
        raise TypeError(f"{fn}: `soft` must be a Python bool (static); got {soft!r}.")
    _check_choice(metric, "metric", METRICS, fn)
    return _triplet_core(
        embeddings,
        labels,
        where,
        margin,
        mining=mining,
        metric=metric,
        soft=soft,
        axis_name=axis_name,
    )


@functools.partial(jax.jit, static_argnames=("mining", "metric", "soft", "axis_name"))
def _triplet_core(
    embeddings, labels, where, margin, *, mining, metric, soft, axis_name
):
    d, pos, neg, dtype = _local_vs_global(embeddings, labels, where, metric, axis_name)
    terms, valid = _triplet_terms(
        d, pos, neg, margin=jnp.asarray(margin, dtype), mining=mining, soft=soft
    )
    terms = jnp.where(valid, terms, 0.0)
    active = valid & (lax.stop_gradient(terms) > 0)
    # Batch-all averages over the triplets that still violate the margin (the
    # "+" variant); the other miners average over every term they produced.
    averaged = active if (mining == "batch_all" and not soft) else valid
    counts = [jnp.sum(m, dtype=jnp.int32) for m in (pos, valid, active, averaged)]
    num_pos, num_terms, num_active, denom = _psum(counts, axis_name)
    loss = _global_sum(jnp.sum(terms), axis_name) / jnp.maximum(denom, 1).astype(dtype)
    stats = {
        "num_positive_pairs": num_pos,
        "num_terms": num_terms,
        "num_active": num_active,
        "fraction_active": num_active / jnp.maximum(num_terms, 1).astype(dtype),
        "valid": num_terms > 0,
    }
    return loss, stats


def triplet_loss(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    margin: ArrayLike = 0.2,
    mining: str = "semi_hard",
    metric: str = "squared_l2",
    soft: bool = False,
    where: ArrayLike | None = None,
    axis_name=None,
) -> jax.Array:
    """Triplet loss with in-batch mining.

    ℓ(a, p, n) = [D(a, p) - D(a, n) + α]_+, or softplus(D(a, p) - D(a, n)) when
    ``soft`` (the soft margin of Hermans et al.; α is then unused). Mining:

    * ``'semi_hard'`` (FaceNet, as tensorflow-addons computes it): one term per
      ordered positive pair (a, p), with n the closest negative farther than p,
      else the farthest negative (`mine_semi_hard`); mean over all those pairs,
      zero-loss pairs included.
    * ``'batch_hard'`` (Hermans et al.): one term per anchor with its hardest
      positive and hardest negative (`mine_batch_hard`); mean over anchors that
      have both (others are excluded).
    * ``'batch_all'``: every valid triplet; mean over the triplets with positive
      loss (over all valid triplets when ``soft``). Memory grows as B³.

    A batch without a usable positive pair (one image per class, or one class
    only, so no negative) returns exactly 0 with zero gradient, never NaN; use
    `triplet_loss_with_stats` to see it flagged. The loss is a batch statistic, so
    it returns a scalar rather than a per-example [B] vector.

    Args:
      embeddings: float [B, D]; normalise them first for the FaceNet / Taha et al.
        setting (squared L2 on L2-normalised embeddings).
      labels: integer [B]; any integer values (only equality is used).
      margin: α, scalar (may be traced). Default 0.2 as in FaceNet and Taha et
        al.'s code.
      mining: ``'semi_hard'``, ``'batch_hard'`` or ``'batch_all'`` (static).
      metric: ``'squared_l2'``, ``'l2'`` or ``'cosine'`` (static); see
        `pairwise_distances`.
      soft: use softplus instead of the hinge (static Python bool).
      where: optional bool [B]; False rows are removed exactly.
      axis_name: optional pmap / shard_map axis name (or tuple). Each device
        mines its anchors against the embeddings of all devices; the value and
        each device's gradient equal the single-device ones on the concatenated
        batch. Under ``shard_map`` use ``check_vma=True`` (the default) if you
        differentiate outside the map.

    Returns:
      Scalar loss in float32 or wider.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from margin_jax.pairs import triplet_loss
      >>> x = jnp.array([[0.0], [0.1], [1.0], [1.2]])
      >>> y = jnp.array([0, 0, 1, 1])
      >>> # pairs (0,1) (1,0) (2,3) (3,2): (0.01 + 0.2 + 0.23 + 0) / 4
      >>> round(float(triplet_loss(x, y, margin=1.0)), 4)
      0.11
      >>> g = jax.jit(jax.grad(triplet_loss))(x, y)  # jit and grad as usual

    References:
      Schroff et al., FaceNet, CVPR 2015, https://arxiv.org/abs/1503.03832;
      Hermans et al., In Defense of the Triplet Loss, 2017,
      https://arxiv.org/abs/1703.07737; Taha et al., WACV 2020,
      https://arxiv.org/abs/1901.08616

    Differs: defaults to margin 0.2 (tensorflow-addons: 1.0) and returns 0, not
    NaN, without positive pairs; pytorch-metric-learning's TripletMarginLoss with
    a semihard miner averages all semi-hard triplets with positive loss and uses
    non-squared L2 of normalised embeddings; its ``smooth_loss`` keeps the margin
    inside the softplus, Hermans et al. and tensorflow-addons drop it, as here.
    """
    return triplet_loss_with_stats(
        embeddings,
        labels,
        margin=margin,
        mining=mining,
        metric=metric,
        soft=soft,
        where=where,
        axis_name=axis_name,
    )[0]


# --------------------------------------------------------------------------------
# Contrastive and n-pair losses.


def contrastive_loss(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    margin: ArrayLike = 1.0,
    metric: str = "l2",
    where: ArrayLike | None = None,
    axis_name=None,
) -> jax.Array:
    """Contrastive loss over every pair of the batch (Hadsell et al.).

    ℓ_ij = y_ij·D_ij² + (1 - y_ij)·[m - D_ij]_+², y_ij = [labels_i = labels_j],
    averaged over all pairs i ≠ j of valid rows (each unordered pair once; 0 when
    the batch has fewer than two valid rows).

    Args:
      embeddings: float [B, D].
      labels: integer [B].
      margin: m, scalar (may be traced).
      metric: ``'l2'`` (default, as Hadsell et al.), ``'squared_l2'`` or
        ``'cosine'`` (static). D_ij² is the square of the chosen distance.
      where: optional bool [B]; False rows are removed exactly.
      axis_name: optional pmap / shard_map axis: pairs span all devices (as in
        `triplet_loss`).

    Returns:
      Scalar loss in float32 or wider.

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax.pairs import contrastive_loss
      >>> x = jnp.array([[0.0], [0.5], [0.75]])
      >>> # pairs: (0,1) same 0.25; (0,2) different 0.0625; (1,2) different 0.5625
      >>> round(float(contrastive_loss(x, jnp.array([0, 0, 1]))), 4)
      0.2917

    References:
      Hadsell, Chopra, LeCun, Dimensionality Reduction by Learning an Invariant
      Mapping, CVPR 2006, http://yann.lecun.com/exdb/publis/pdf/hadsell-chopra-lecun-06.pdf

    Differs: no factor ½ (Hadsell has it); pytorch-metric-learning's
    ContrastiveLoss averages positive and negative pairs separately over the
    non-zero terms and adds the two means.
    """
    fn = "contrastive_loss"
    _check_batch(embeddings, labels, where, fn)
    _check_choice(metric, "metric", METRICS, fn)
    return _contrastive_core(
        embeddings, labels, where, margin, metric=metric, axis_name=axis_name
    )


@functools.partial(jax.jit, static_argnames=("metric", "axis_name"))
def _contrastive_core(embeddings, labels, where, margin, *, metric, axis_name):
    d, pos, neg, dtype = _local_vs_global(embeddings, labels, where, metric, axis_name)
    margin = jnp.asarray(margin, dtype)
    terms = jnp.where(pos, d**2, jnp.where(neg, jax.nn.relu(margin - d) ** 2, 0.0))
    count = _psum(jnp.sum(pos | neg, dtype=jnp.int32), axis_name)
    return _global_sum(jnp.sum(terms), axis_name) / jnp.maximum(count, 1).astype(dtype)


def npair_loss(
    anchors: ArrayLike, positives: ArrayLike, *, where: ArrayLike | None = None
) -> jax.Array:
    """Multi-class N-pair loss (Sohn 2016): softmax CE over anchor·positive scores.

    S_ij = a_i·p_j; ℓ_i = logsumexp_j S_ij - S_ii = log(1 + Σ_{j≠i}
    exp(S_ij - S_ii)). Row i's positive is p_i and the other positives are its
    negatives, so the N pairs must come from N distinct classes.

    Args:
      anchors: float [N, D].
      positives: float [N, D], positives[i] of the same class as anchors[i].
      where: optional bool [N]; False pairs give 0 and are no one's negative.

    Returns:
      Per-pair loss [N] (the caller reduces), float32 or wider.

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax.pairs import npair_loss
      >>> a = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> [round(v, 4) for v in npair_loss(a, a).tolist()]  # log(1 + e^-1)
      [0.3133, 0.3133]

    References:
      Sohn, Improved Deep Metric Learning with Multi-class N-pair Loss Objective,
      NeurIPS 2016, https://papers.nips.cc/paper/6200-improved-deep-metric-learning-with-multi-class-n-pair-loss-objective

    Differs: no L2 penalty on the embeddings (Sohn adds λ·||f||²; add it
    yourself); returns [N] where pytorch-metric-learning's NPairsLoss returns the
    mean.
    """
    fn = "npair_loss"
    _checks.check_rank(anchors, 2, "anchors", fn, "[N, D]")
    _checks.check_rank(positives, 2, "positives", fn, "[N, D]")
    _checks.check_floating(anchors, "anchors", fn)
    _checks.check_floating(positives, "positives", fn)
    if jnp.shape(anchors) != jnp.shape(positives):
        raise ValueError(
            f"{fn}: `anchors` and `positives` must have the same shape [N, D]; got "
            f"`anchors` shape {tuple(jnp.shape(anchors))} and `positives` shape "
            f"{tuple(jnp.shape(positives))}."
        )
    n = jnp.shape(anchors)[0]
    _checks.check_where(where, n, fn, ref="anchors", ref_shape=jnp.shape(anchors))
    return _npair_core(anchors, positives, where)


@jax.jit
def _npair_core(anchors, positives, where):
    n = anchors.shape[0]
    dtype = _checks.compute_dtype(anchors, positives)
    a, valid = _prepare(anchors, where, dtype)
    p, _ = _prepare(positives, where, dtype)
    s = jnp.matmul(a, p.T, precision=_HIGHEST)
    # Padded columns are nobody's negative; the diagonal stays so that every row
    # (padded ones too) has a finite logsumexp and a finite gradient.
    keep = valid[None, :] | jnp.eye(n, dtype=bool)
    lse = jax.nn.logsumexp(jnp.where(keep, s, -jnp.inf), axis=1)
    return jnp.where(valid, lse - jnp.diagonal(s), 0.0)


# --------------------------------------------------------------------------------
# Two-head ranking regulariser.


def two_head_loss(
    class_logits: ArrayLike,
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    lambda_: ArrayLike = 1.0,
    margin: ArrayLike = 0.2,
    mining: str = "semi_hard",
    metric: str = "squared_l2",
    soft: bool = False,
    normalize: bool = True,
    where: ArrayLike | None = None,
    axis_name=None,
) -> jax.Array:
    """Classifier cross-entropy plus λ·triplet on a separate embedding head.

    L = mean_i CE(z_i, y_i) + λ·triplet(x̂, y), with z the classifier head's
    logits [B, C] (GAP -> FC(C)) and x̂ the L2-normalised output of the embedding
    head (flatten -> FC(256) -> L2-normalise) of the same backbone. Both heads are
    trained by one gradient of this scalar, e.g. inside one ``jax.jit`` step.
    Taha et al.'s setting is the default: squared L2 on L2-normalised 256-d
    embeddings, α = 0.2, λ = 1, semi-hard mining, P×K batches of 8 classes × 4
    images.

    Args:
      class_logits: float [B, C], the classifier head.
      embeddings: float [B, D], the embedding head (normalised here when
        ``normalize``).
      labels: integer [B] in [0, C).
      lambda_: λ, weight of the triplet term (may be traced).
      margin, mining, metric, soft: passed to `triplet_loss`.
      normalize: L2-normalise the embeddings first (static).
      where: optional bool [B]; False rows are removed from both terms.
      axis_name: optional pmap / shard_map axis: the CE mean and the mining span
        all devices.

    Returns:
      Scalar loss in float32 or wider.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from margin_jax.pairs import two_head_loss
      >>> logits, emb = jnp.zeros((4, 2)), jnp.eye(4)
      >>> y = jnp.array([0, 0, 1, 1])
      >>> round(float(jax.jit(two_head_loss)(logits, emb, y)), 4)  # ln 2 + 0.2
      0.8931

    References:
      Taha, Chen, Misu, Shrivastava, Davis, Boosting Standard Classification
      Architectures Through a Ranking Regularizer, WACV 2020,
      https://arxiv.org/abs/1901.08616

    Differs: the summary of the paper quotes α = 2; the authors' code uses 0.2,
    as here.
    """
    fn = "two_head_loss"
    _check_batch(embeddings, labels, where, fn)
    _checks.check_rank(class_logits, 2, "class_logits", fn, "[B, C]")
    _checks.check_floating(class_logits, "class_logits", fn)
    _checks.check_same_batch(class_logits, embeddings, "class_logits", "embeddings", fn)
    shape = tuple(jnp.shape(class_logits))
    _check_labels_in_range(labels, where, shape[1], fn, "class_logits", shape)
    _check_choice(mining, "mining", MININGS, fn)
    _check_choice(metric, "metric", METRICS, fn)
    if not isinstance(soft, bool) or not isinstance(normalize, bool):
        raise TypeError(f"{fn}: `soft` and `normalize` must be Python bools (static).")
    return _two_head_core(
        class_logits,
        embeddings,
        labels,
        where,
        lambda_,
        margin,
        mining=mining,
        metric=metric,
        soft=soft,
        normalize=normalize,
        axis_name=axis_name,
    )


@functools.partial(
    jax.jit, static_argnames=("mining", "metric", "soft", "normalize", "axis_name")
)
def _two_head_core(
    class_logits,
    embeddings,
    labels,
    where,
    lambda_,
    margin,
    *,
    mining,
    metric,
    soft,
    normalize,
    axis_name,
):
    dtype = _checks.compute_dtype(class_logits, embeddings)
    z, valid = _prepare(class_logits, where, dtype)
    labels = jnp.asarray(labels)
    z_y = jnp.take_along_axis(z, labels[:, None], axis=1, mode="clip")[:, 0]
    ce = jnp.where(valid, jax.nn.logsumexp(z, axis=1) - z_y, 0.0)
    count = _psum(jnp.sum(valid, dtype=jnp.int32), axis_name)
    ce = _global_sum(jnp.sum(ce), axis_name) / jnp.maximum(count, 1).astype(dtype)
    x, _ = _prepare(embeddings, where, dtype)
    x = l2_normalize(x) if normalize else x
    trip, _ = _triplet_core(
        x,
        labels,
        where,
        margin,
        mining=mining,
        metric=metric,
        soft=soft,
        axis_name=axis_name,
    )
    return ce + jnp.asarray(lambda_, dtype) * trip
