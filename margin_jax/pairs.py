"""Pair losses: triplet, contrastive, n-pair and the two-head regulariser.

Every function here works on a batch of embeddings ``[B, D]`` and integer labels
``[B]``. The pair and triplet losses are batch statistics, so unlike the
per-example margin-softmax losses they return a scalar (the mean over the pairs or
triplets they select). The pipeline is

    distances D [B, B] -> positive / negative masks -> miner -> hinge -> mean

with the first stages in `margin_jax.distances` and `margin_jax.mining` (their
public names are re-exported here). Padded rows (``where=False``) are removed
exactly: they are neither anchors, positives nor negatives and get no gradient,
so ``loss(x, y, where=m) == loss(x[m], y[m])``.

Multi-device batches: the mined losses take ``axis_name`` with the meaning and
gradient rule of `margin_jax.collective`. Each device gathers the embeddings,
labels and masks of the named axis, computes the terms of its own anchors
against the global batch, and the mean is a `margin_jax.collective.global_mean`.
The value on every device and the gradient with respect to each device's
embeddings equal the single-device value and gradient on the concatenated batch
(so the gradient of replicated parameters is the psum over the axis).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from margin_jax import _checks, collective
from margin_jax.batch import (
    check_batch,
    check_choice,
    check_labels_in_range,
    prepare_embeddings,
)
from margin_jax.cosine import l2_normalize
from margin_jax.cross_entropy import cross_entropy_from_gaps
from margin_jax.distances import METRICS as METRICS
from margin_jax.distances import distances_to_batch
from margin_jax.distances import negative_mask as negative_mask
from margin_jax.distances import pairwise_distances as pairwise_distances
from margin_jax.distances import positive_mask as positive_mask
from margin_jax.mining import MININGS as MININGS
from margin_jax.mining import batch_hard_pairs, semi_hard_negatives
from margin_jax.mining import mine_batch_all as mine_batch_all
from margin_jax.mining import mine_batch_hard as mine_batch_hard
from margin_jax.mining import mine_semi_hard as mine_semi_hard

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

_HIGHEST = lax.Precision.HIGHEST


# --------------------------------------------------------------------------------
# Triplet loss.


def _hinge(gap: jax.Array, margin, soft: bool) -> jax.Array:
    return jax.nn.softplus(gap) if soft else jax.nn.relu(gap + margin)


def _triplet_terms(d, pos, neg, *, margin, mining, soft):
    """Loss terms of the local anchors and which of them are valid."""
    dist = lax.stop_gradient(d)
    if mining == "semi_hard":
        idx, valid = semi_hard_negatives(dist, pos, neg)
        return _hinge(d - jnp.take_along_axis(d, idx, axis=1), margin, soft), valid
    if mining == "batch_hard":
        p, n, valid = batch_hard_pairs(dist, pos, neg)
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
    check_batch(embeddings, labels, where, fn)
    check_choice(mining, "mining", MININGS, fn)
    if not isinstance(soft, bool):
        raise TypeError(f"{fn}: `soft` must be a Python bool (static); got {soft!r}.")
    check_choice(metric, "metric", METRICS, fn)
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
    d, pos, neg, dtype = distances_to_batch(
        embeddings, labels, where, metric=metric, axis_name=axis_name
    )
    terms, valid = _triplet_terms(
        d, pos, neg, margin=jnp.asarray(margin, dtype), mining=mining, soft=soft
    )
    terms = jnp.where(valid, terms, 0.0)
    active = valid & (lax.stop_gradient(terms) > 0)
    # Batch-all averages over the triplets that still violate the margin (the
    # "+" variant); the other miners average over every term they produced.
    averaged = active if (mining == "batch_all" and not soft) else valid
    loss = collective.global_mean(terms, where=averaged, axis_name=axis_name)
    counts = [jnp.sum(m, dtype=jnp.int32) for m in (pos, valid, active)]
    num_pos, num_terms, num_active = collective.psum_no_grad(counts, axis_name)
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
    check_batch(embeddings, labels, where, fn)
    check_choice(metric, "metric", METRICS, fn)
    return _contrastive_core(
        embeddings, labels, where, margin, metric=metric, axis_name=axis_name
    )


@functools.partial(jax.jit, static_argnames=("metric", "axis_name"))
def _contrastive_core(embeddings, labels, where, margin, *, metric, axis_name):
    d, pos, neg, dtype = distances_to_batch(
        embeddings, labels, where, metric=metric, axis_name=axis_name
    )
    margin = jnp.asarray(margin, dtype)
    terms = jnp.where(pos, d**2, jnp.where(neg, jax.nn.relu(margin - d) ** 2, 0.0))
    return collective.global_mean(terms, where=pos | neg, axis_name=axis_name)


def npair_loss(
    anchors: ArrayLike, positives: ArrayLike, *, where: ArrayLike | None = None
) -> jax.Array:
    """Multi-class N-pair loss (Sohn 2016): softmax CE over anchor·positive scores.

    S_ij = a_i·p_j; ℓ_i = logsumexp_j S_ij - S_ii = log(1 + Σ_{j≠i}
    exp(S_ij - S_ii)), computed as the latter from the gaps S_ij - S_ii by the
    package's one cross-entropy (`margin_jax.cross_entropy`). Row i's positive
    is p_i and the other positives are its negatives, so the N pairs must come
    from N distinct classes.

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
    a, valid = prepare_embeddings(anchors, where, dtype)
    p, _ = prepare_embeddings(positives, where, dtype)
    s = jnp.matmul(a, p.T, precision=_HIGHEST)
    # Padded columns are nobody's negative (a gap of -inf does not count).
    gaps = jnp.where(valid[None, :], s - jnp.diagonal(s)[:, None], -jnp.inf)
    ce = cross_entropy_from_gaps(gaps, jnp.arange(n))
    return jnp.where(valid, ce, 0.0)


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
    check_batch(embeddings, labels, where, fn)
    _checks.check_rank(class_logits, 2, "class_logits", fn, "[B, C]")
    _checks.check_floating(class_logits, "class_logits", fn)
    _checks.check_same_batch(class_logits, embeddings, "class_logits", "embeddings", fn)
    shape = tuple(jnp.shape(class_logits))
    check_labels_in_range(labels, where, shape[1], fn, "class_logits", shape)
    check_choice(mining, "mining", MININGS, fn)
    check_choice(metric, "metric", METRICS, fn)
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
    z, valid = prepare_embeddings(class_logits, where, dtype)
    labels = jnp.asarray(labels)
    z_y = jnp.take_along_axis(z, labels[:, None], axis=1, mode="clip")
    ce = cross_entropy_from_gaps(z - z_y, labels)
    ce = collective.global_mean(ce, where=valid, axis_name=axis_name)
    x, _ = prepare_embeddings(embeddings, where, dtype)
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
