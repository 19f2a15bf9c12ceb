"""Miners: which positives and negatives of a batch the triplet loss uses.

Each miner takes the distances [B, B] of a batch
(`margin_jax.distances.pairwise_distances`) and its labels, and returns indices
and a validity mask; none differentiates (the choice is made on stop-gradient
distances). `semi_hard_negatives` and
`batch_hard_pairs` are the same miners on the [b, B] distances of the local
anchors against a (gathered) global batch, for `margin_jax.pairs.triplet_loss`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from margin_jax import _checks
from margin_jax.batch import check_distances, valid_rows
from margin_jax.distances import label_masks, pair_masks

__all__ = [
    "MININGS",
    "mine_semi_hard",
    "mine_batch_hard",
    "mine_batch_all",
    "semi_hard_negatives",
    "batch_hard_pairs",
]

MININGS = ("semi_hard", "batch_hard", "batch_all")


def _sortable_key(x: jax.Array) -> jax.Array:
    """Integers that sort like the floats ``x`` (NaN aside).

    Integer sorts are several times faster than float sorts on CPU. Non-negative
    floats' bits already sort as integers; negative ones get their magnitude bits
    flipped. -0.0 is mapped to +0.0 first so that equal floats give equal keys.
    """
    itype = jnp.int64 if x.dtype.itemsize == 8 else jnp.int32
    bits = lax.bitcast_convert_type(jnp.where(x == 0, jnp.zeros_like(x), x), itype)
    return jnp.where(bits < 0, bits ^ jnp.iinfo(itype).max, bits)


def semi_hard_negatives(dist, pos, neg) -> tuple[jax.Array, jax.Array]:
    """`mine_semi_hard` on [b, B] distances of local anchors against the batch.

    Unchecked; ``dist`` must be stop-gradient (the choice is not differentiated),
    ``pos`` and ``neg`` the masks of `margin_jax.distances.pair_masks`.

    Returns:
      ``(negatives, valid)``: int [b, B] chosen negative of each pair, bool [b, B].
    """
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


def batch_hard_pairs(dist, pos, neg) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`mine_batch_hard` on [b, B] distances of local anchors against the batch.

    Unchecked; ``dist`` must be stop-gradient.

    Returns:
      ``(positives, negatives, valid)``: int [b], int [b], bool [b].
    """
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
      >>> from margin_jax.distances import pairwise_distances
      >>> from margin_jax.mining import mine_semi_hard
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
    check_distances(distances, labels, where, "mine_semi_hard")
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
      >>> from margin_jax.distances import pairwise_distances
      >>> from margin_jax.mining import mine_batch_hard
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
    check_distances(distances, labels, where, "mine_batch_hard")
    return _mine_core(distances, labels, where, mining="batch_hard")


@functools.partial(jax.jit, static_argnames=("mining",))
def _mine_core(distances, labels, where, *, mining):
    labels = jnp.asarray(labels)
    valid = valid_rows(where, labels.shape[0])
    pos, neg = pair_masks(labels, valid, labels, valid, 0)
    dtype = _checks.compute_dtype(distances)
    dist = lax.stop_gradient(jnp.asarray(distances, dtype))
    if mining == "semi_hard":
        idx, ok = semi_hard_negatives(dist, pos, neg)
        return idx.astype(jnp.int32), ok
    p, n, ok = batch_hard_pairs(dist, pos, neg)
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
      >>> from margin_jax.mining import mine_batch_all
      >>> int(mine_batch_all(jnp.array([0, 0, 1])).sum())  # (0,1,2) and (1,0,2)
      2

    References:
      Hermans et al., In Defense of the Triplet Loss, 2017,
      https://arxiv.org/abs/1703.07737

    Differs: pytorch-metric-learning returns index lists, not a mask.
    """
    pos, neg = label_masks(labels, where, "mine_batch_all")
    return pos[:, :, None] & neg[:, None, :]
