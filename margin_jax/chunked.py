"""Margin softmax for millions of classes: class-chunked, class-sharded, Partial FC.

The dense composer builds the logits [B, C]; at C = 10^6 that is 1 GB for B = 256
in float32, before its gradient. The functions here compute the same loss
exactly, with the same stage functions, without ever holding more than one block
[B, chunk] of logits:

* the target logit f(c_y) is computed once from the gathered target rows
  W[y] [B, D];
* the non-target gaps d_ij = s·(g(c_ij, f_i) - f_i) are reduced block by block
  with an online log-sum-exp, lse_i = log Σ_{j≠y_i} exp(d_ij), and the loss is
  softplus(lse_i) = log(1 + Σ_{j≠y} exp(d_ij)), which is the cross-entropy
  without a cancellation-prone subtraction from a full sum;
* the backward pass (a `jax.custom_vjp`) recomputes each block and accumulates
  dL/dx and dL/dW block by block.

Peak memory is O(B·chunk) for the loss plus the O(C·D) of W and its gradient.
Any elementwise non-target stage (`margin_jax.masks`) and any target stage
(`margin_jax.margins`) work, so NormFace, CosFace, ArcFace, combined,
SphereFace (normalised), SV / MV, CurricularFace and EqM all run chunked.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from margin_jax import _checks
from margin_jax.cosine import clip_cosine, l2_normalize, normalize_rows_fast

__all__ = [
    "chunked_margin_loss",
    "sharded_margin_loss",
    "partial_fc_sample",
    "PartialFCSample",
    "non_target_logsumexp",
]

DEFAULT_CHUNK = 2048


def _gap_fn(non_target_fn):
    """(x̂ [B, D], W block [n, D], f [B], s [B]) -> gaps s·(g(c, f) - f) [B, n]."""

    def gaps(x_hat, w_block, target, scale):
        cos = clip_cosine(x_hat @ normalize_rows_fast(w_block).T)
        z = cos if non_target_fn is None else non_target_fn(cos, target[:, None])
        return scale[:, None] * (z - target[:, None])

    return gaps


def _zeros_like(x, *deps):
    """Zeros shaped like ``x`` that are device-varying (inside shard_map) whenever
    ``x`` or any of ``deps`` is, so loop carries keep one type across iterations."""
    zero = jnp.zeros((), x.dtype)
    out = jnp.where(jnp.zeros(x.shape, bool), x, zero)
    for dep in deps:
        out = out + jnp.where(False, jnp.ravel(dep)[0], zero).astype(x.dtype)
    return out


def _block(k, chunk, num_rows):
    """Start row of block k; the last block is shifted back to stay in bounds."""
    return jnp.minimum(k * chunk, num_rows - chunk)


def _block_mask(k, start, chunk, labels, offset, num_valid):
    """Columns of block k that count: not seen before, valid, not the target."""
    rows = start + jax.lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
    return (rows >= k * chunk) & (rows < num_valid) & (rows + offset != labels[:, None])


def _lse_forward(
    gap, chunk, x_hat, weights, target, scale, labels, offset, num_valid, consts
):
    num_rows = weights.shape[0]
    n_blocks = -(-num_rows // chunk)

    def body(k, carry):
        top, total = carry
        start = _block(k, chunk, num_rows)
        w_block = jax.lax.dynamic_slice_in_dim(weights, start, chunk)
        gaps = gap(x_hat, w_block, target, scale, *consts)
        mask = _block_mask(k, start, chunk, labels, offset, num_valid)
        new_top = jnp.maximum(top, jnp.max(jnp.where(mask, gaps, 0.0), axis=-1))
        terms = jnp.where(mask, jnp.exp(gaps - new_top[:, None]), 0.0)
        return new_top, total * jnp.exp(top - new_top) + jnp.sum(terms, axis=-1)

    zeros = _zeros_like(target, x_hat, weights, scale)
    top, total = jax.lax.fori_loop(0, n_blocks, body, (zeros, zeros))
    return top + jnp.log(total)  # -inf where no column counts


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _lse(gap, chunk, x_hat, weights, target, scale, labels, offset, num_valid, *consts):
    return _lse_forward(
        gap, chunk, x_hat, weights, target, scale, labels, offset, num_valid, consts
    )


def _lse_fwd(
    gap, chunk, x_hat, weights, target, scale, labels, offset, num_valid, *consts
):
    lse = _lse_forward(
        gap, chunk, x_hat, weights, target, scale, labels, offset, num_valid, consts
    )
    return lse, (x_hat, weights, target, scale, labels, offset, num_valid, consts, lse)


def _lse_bwd(gap, chunk, residuals, cot):
    x_hat, weights, target, scale, labels, offset, num_valid, consts, lse = residuals
    num_rows = weights.shape[0]
    n_blocks = -(-num_rows // chunk)
    float_consts = [jnp.issubdtype(c.dtype, jnp.inexact) for c in consts]

    def body(k, carry):
        d_x, d_w, d_target, d_scale, d_consts = carry
        start = _block(k, chunk, num_rows)
        w_block = jax.lax.dynamic_slice_in_dim(weights, start, chunk)
        gaps, vjp = jax.vjp(gap, x_hat, w_block, target, scale, *consts)
        mask = _block_mask(k, start, chunk, labels, offset, num_valid)
        # d lse_i / d gap_ij = softmax over the counted columns = exp(gap - lse).
        probs = jnp.where(mask, jnp.exp(jnp.where(mask, gaps - lse[:, None], 0.0)), 0.0)
        grads = vjp(probs * cot[:, None])
        block_dw = jax.lax.dynamic_slice_in_dim(d_w, start, chunk) + grads[1]
        d_w = jax.lax.dynamic_update_slice_in_dim(d_w, block_dw, start, axis=0)
        d_consts = tuple(
            acc + g if is_float else acc
            for acc, g, is_float in zip(d_consts, grads[4:], float_consts, strict=True)
        )
        return d_x + grads[0], d_w, d_target + grads[2], d_scale + grads[3], d_consts

    deps = (x_hat, weights, target, scale, cot)
    init = (
        _zeros_like(x_hat, *deps),
        _zeros_like(weights, *deps),
        _zeros_like(target, *deps),
        _zeros_like(scale, *deps),
        tuple(
            _zeros_like(c, *deps) if f else c
            for c, f in zip(consts, float_consts, strict=True)
        ),
    )
    d_x, d_w, d_target, d_scale, d_consts = jax.lax.fori_loop(0, n_blocks, body, init)
    d_consts = tuple(
        d if f else None for d, f in zip(d_consts, float_consts, strict=True)
    )
    return (d_x, d_w, d_target, d_scale, None, None, None, *d_consts)


_lse.defvjp(_lse_fwd, _lse_bwd)


def non_target_logsumexp(
    x_hat: jax.Array,
    weights: jax.Array,
    target: jax.Array,
    scale: jax.Array,
    labels: jax.Array,
    *,
    non_target_fn=None,
    chunk_size: int = DEFAULT_CHUNK,
    offset: ArrayLike = 0,
    num_valid: ArrayLike | None = None,
) -> jax.Array:
    """lse_i = log Σ_j exp(s_i·(g(c_ij, f_i) - f_i)) over the rows j of ``weights``.

    The rows that count are those with index < ``num_valid`` whose class
    (``offset`` + row) is not the label. Computed in blocks of ``chunk_size`` rows
    with an online log-sum-exp; the VJP recomputes each block. -inf where no row
    counts.

    Args:
      x_hat: [B, D] normalised embeddings.
      weights: [N, D] class centres (raw; each block is normalised on the fly).
      target: [B] margined target logits f(c_y) (before scaling).
      scale: [B] scales s_i.
      labels: [B] global class indices.
      non_target_fn: optional elementwise non-target stage.
      chunk_size: rows per block (static); clipped to N.
      offset: global class index of row 0 of ``weights``.
      num_valid: rows of ``weights`` that are real classes (default N).

    Returns:
      [B] log-sum-exp of the non-target gaps.

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import non_target_logsumexp
      >>> x = jnp.array([[1.0, 0.0]])
      >>> w = jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
      >>> lse = non_target_logsumexp(x, w, jnp.ones(1), jnp.ones(1), jnp.array([0]))
      >>> round(float(lse[0]), 4)  # log(e^(0-1) + e^(-1-1))
      -0.6867
    """
    chunk = int(min(chunk_size, weights.shape[0]))
    if num_valid is None:
        num_valid = weights.shape[0]
    gap = _gap_fn(non_target_fn)
    converted, consts = jax.closure_convert(gap, x_hat, weights[:chunk], target, scale)
    return _lse(
        converted,
        chunk,
        x_hat,
        weights,
        target,
        scale,
        labels,
        jnp.asarray(offset, jnp.int32),
        jnp.asarray(num_valid, jnp.int32),
        *consts,
    )


def _check_chunk(chunk_size, fn):
    if (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, int)
        or chunk_size < 1
    ):
        raise ValueError(
            f"{fn}: `chunk_size` must be a positive int, got {chunk_size!r}."
        )


def _validate(fn, embeddings, weights, labels, where, weights_layout="[C, D]"):
    _checks.check_embeddings_weights(
        embeddings, weights, fn, weights_layout=weights_layout
    )
    batch = np.shape(embeddings)[0]
    _checks.check_labels(
        labels, batch, fn, ref="embeddings", ref_shape=np.shape(embeddings)
    )
    _checks.check_where(
        where, batch, fn, ref="embeddings", ref_shape=np.shape(embeddings)
    )


def _target_logits(x_hat, target_rows, target_fn):
    """f(c_y) [B] from the gathered target rows W[y] [B, D]."""
    c_y = clip_cosine(jnp.sum(x_hat * normalize_rows_fast(target_rows), axis=-1))
    return target_fn(c_y)


def chunked_margin_loss(
    embeddings: ArrayLike,
    weights: ArrayLike,
    labels: ArrayLike,
    *,
    target_fn,
    non_target_fn=None,
    scale: ArrayLike,
    chunk_size: int = DEFAULT_CHUNK,
    where: ArrayLike | None = None,
) -> jax.Array:
    """Exact margin softmax over class blocks: never builds the logits [B, C].

    Equal in value and gradient (w.r.t. embeddings, weights, scale and traced
    hyperparameters) to ``margin_softmax_loss(cosine_logits(embeddings, weights),
    labels, target_fn=..., non_target_fn=..., scale=...)``, with peak memory
    O(B·chunk_size) for the loss instead of O(B·C).

    Args:
      embeddings: [B, D] features (normalised inside).
      weights: [C, D] class centres (normalised inside, block by block).
      labels: [B] integer labels in [0, C).
      target_fn: target stage, as for `margin_softmax_loss`.
      non_target_fn: optional elementwise non-target stage.
      scale: s, scalar or [B].
      chunk_size: classes per block (static int); C need not be a multiple, and
        C < chunk_size is one block. Default 2048: the loss then needs about
        16 MiB at B = 256, D = 512 whatever C (1.6% of the dense logits at C = 1M).
      where: optional bool [B]; False rows give 0 and no gradient.

    Returns:
      [B] per-example loss (float32 or wider).

    Example:
      >>> import functools, jax, jax.numpy as jnp
      >>> import margin_jax as mj
      >>> x = jax.random.normal(jax.random.key(0), (4, 8))
      >>> w = jax.random.normal(jax.random.key(1), (1000, 8))
      >>> y = jnp.array([3, 999, 0, 512])
      >>> f = functools.partial(mj.arcface_target, margin=0.5)
      >>> a = mj.chunked_margin_loss(x, w, y, target_fn=f, scale=64.0, chunk_size=96)
      >>> b = mj.margin_softmax_loss(mj.cosine_logits(x, w), y, target_fn=f, scale=64.0)
      >>> bool(jnp.allclose(a, b, rtol=1e-5))
      True
    """
    fn = "chunked_margin_loss"
    _validate(fn, embeddings, weights, labels, where)
    _check_chunk(chunk_size, fn)
    embeddings, weights = jnp.asarray(embeddings), jnp.asarray(weights)
    dtype = _checks.compute_dtype(embeddings, weights)
    num_classes = weights.shape[0]
    if _checks.is_concrete(labels):
        _checks.check_labels(
            labels,
            embeddings.shape[0],
            fn,
            num_classes=num_classes,
            ref="weights",
            ref_shape=weights.shape,
        )
    x_hat = l2_normalize(embeddings.astype(dtype))
    weights = weights.astype(dtype)
    labels = jnp.asarray(labels)
    if where is not None:
        where = jnp.asarray(where)
        x_hat = jnp.where(where[:, None], x_hat, 0.0)
    scale = _checks.scale_vector(scale, x_hat.shape[0], dtype, fn, where=where)
    target = _target_logits(x_hat, jnp.take(weights, labels, axis=0), target_fn)
    lse = non_target_logsumexp(
        x_hat,
        weights,
        target,
        scale,
        labels,
        non_target_fn=non_target_fn,
        chunk_size=chunk_size,
    )
    loss = jax.nn.softplus(lse)
    return loss if where is None else jnp.where(where, loss, 0.0)


def sharded_margin_loss(
    embeddings: ArrayLike,
    weights_shard: ArrayLike,
    labels: ArrayLike,
    *,
    axis_name: str,
    target_fn,
    non_target_fn=None,
    scale: ArrayLike,
    chunk_size: int | None = None,
    where: ArrayLike | None = None,
    num_classes: int | None = None,
    num_valid: ArrayLike | None = None,
) -> jax.Array:
    """Margin softmax with W sharded by class over a device axis (model parallel).

    Call inside `jax.pmap` or `jax.shard_map`. Device d holds the classes
    [d·C_d, (d+1)·C_d) as ``weights_shard`` [C_d, D] and its own slice of the
    batch. Embeddings and labels are all-gathered; each device computes the
    logits of the global batch against its shard (block by block when
    ``chunk_size`` is set) and the per-shard log-sum-exps are combined across
    devices. Returns the loss of the device's own rows.

    Gradients: with the per-device objective ``J_d = loss.sum() / B_global`` (so
    that Σ_d J_d is the global mean), `jax.grad` inside pmap/shard_map gives each
    device the gradient of the global mean w.r.t. its own ``weights_shard`` and
    its own ``embeddings`` (the all-gathers transpose to reduce-scatters); do not
    pmean them again. Replicated parameters upstream of the embeddings (the
    backbone) then need a psum of their gradients over the axis.

    Uneven class counts: pad the last shards with rows and pass the true
    ``num_classes``; rows with global index >= num_classes are ignored.

    Args:
      embeddings: [b, D] this device's features.
      weights_shard: [C_d, D] this device's class centres.
      labels: [b] global class indices.
      axis_name: the device axis.
      target_fn, non_target_fn, scale: as for `margin_softmax_loss` (scale may be
        a scalar or this device's [b]).
      chunk_size: block size inside each shard (default: the whole shard).
      where: optional bool [b].
      num_classes: the real class count C <= n_devices·C_d (default equal).
      num_valid: instead of ``num_classes``, this device's count of real rows
        (a prefix of the shard), e.g. `PartialFCSample.num_valid`.

    Returns:
      [b] per-example loss for this device's rows.

    Example:
      >>> import functools, jax, jax.numpy as jnp
      >>> import margin_jax as mj
      >>> n = jax.local_device_count()
      >>> x = jax.random.normal(jax.random.key(0), (n, 2, 8))       # [devices, b, D]
      >>> w = jax.random.normal(jax.random.key(1), (n, 5, 8))       # 5 classes each
      >>> y = jnp.arange(2 * n).reshape(n, 2) % (5 * n)
      >>> f = functools.partial(mj.arcface_target, margin=0.5)
      >>> loss = jax.pmap(lambda x, w, y: mj.sharded_margin_loss(
      ...     x, w, y, axis_name="d", target_fn=f, scale=64.0), axis_name="d")(x, w, y)
      >>> dense = mj.arcface_loss(mj.cosine_logits(x.reshape(-1, 8), w.reshape(-1, 8)),
      ...                         y.reshape(-1))
      >>> bool(jnp.allclose(loss.reshape(-1), dense, rtol=1e-5))
      True
    """
    fn = "sharded_margin_loss"
    _validate(fn, embeddings, weights_shard, labels, where, "[C_shard, D]")
    embeddings, weights_shard = jnp.asarray(embeddings), jnp.asarray(weights_shard)
    dtype = _checks.compute_dtype(embeddings, weights_shard)
    local_batch, shard_rows = embeddings.shape[0], weights_shard.shape[0]
    chunk = shard_rows if chunk_size is None else chunk_size
    _check_chunk(chunk, fn)
    device = jax.lax.axis_index(axis_name)
    offset = device * shard_rows
    total_rows = jax.lax.axis_size(axis_name) * shard_rows
    if num_valid is None:
        num_classes = total_rows if num_classes is None else num_classes
        num_valid = jnp.clip(num_classes - offset, 0, shard_rows)
    elif num_classes is not None:
        raise ValueError(f"{fn}: give `num_classes` or `num_valid`, not both.")

    valid = jnp.ones((local_batch,), bool) if where is None else jnp.asarray(where)
    x_hat = l2_normalize(embeddings.astype(dtype))
    x_hat = jnp.where(valid[:, None], x_hat, 0.0)
    scale = _checks.scale_vector(scale, local_batch, dtype, fn, where=valid)
    gather = functools.partial(jax.lax.all_gather, axis_name=axis_name, tiled=True)
    x_all, labels_all, scale_all = (
        gather(x_hat),
        gather(jnp.asarray(labels)),
        gather(scale),
    )
    weights_shard = weights_shard.astype(dtype)

    # Target cosines: the device owning y_i contributes x̂_i · ŵ_{y_i}.
    local = labels_all - offset
    owned = (local >= 0) & (local < shard_rows)
    rows = jnp.take(weights_shard, jnp.clip(local, 0, shard_rows - 1), axis=0)
    part = jnp.where(owned, jnp.sum(x_all * normalize_rows_fast(rows), axis=-1), 0.0)
    c_y = clip_cosine(jnp.sum(jax.lax.all_gather(part, axis_name), axis=0))
    target = target_fn(c_y)

    lse_shard = non_target_logsumexp(
        x_all,
        weights_shard,
        target,
        scale_all,
        labels_all,
        non_target_fn=non_target_fn,
        chunk_size=chunk,
        offset=offset,
        num_valid=num_valid,
    )
    lse = jax.nn.logsumexp(jax.lax.all_gather(lse_shard, axis_name), axis=0)
    loss = jax.nn.softplus(lse)
    loss = jax.lax.dynamic_slice_in_dim(loss, device * local_batch, local_batch)
    return jnp.where(valid, loss, 0.0)


class PartialFCSample(NamedTuple):
    """What `partial_fc_sample` returns.

    Attributes:
      index: [n] sorted rows of this device's shard to use this step.
      labels: [b] the labels remapped into the concatenation of every device's n
        sampled rows.
      num_valid: scalar, how many of the n sampled rows are real classes (a
        prefix; padding rows of an uneven last shard come last). Pass it as
        ``num_valid`` to `sharded_margin_loss`.
    """

    index: jax.Array
    labels: jax.Array
    num_valid: jax.Array


def partial_fc_sample(
    labels: ArrayLike,
    num_classes: int,
    *,
    rate: float,
    key: jax.Array,
    axis_name: str | None = None,
    total_classes: int | None = None,
) -> PartialFCSample:
    """Partial FC: the rows of this class shard to use this step, labels remapped.

    Every class of the (global) batch that lives in this shard is sampled, then
    uniformly random other classes, n = max(⌈rate·C_d⌉, global batch size) rows
    in all (capped at C_d), so the positives always fit. Gather
    ``weights_shard[index]`` and pass it with the remapped labels and
    ``num_valid`` to `sharded_margin_loss` (without an axis: to
    `chunked_margin_loss` or the dense loss): only sampled rows get gradient.

    Args:
      labels: [b] global labels of this device's rows.
      num_classes: C_d, rows of this device's shard (static).
      rate: sampling rate r in (0, 1] (static). At 1.0 every row is kept in
        order and the loss equals the unsampled one.
      key: PRNG key.
      axis_name: the device axis (None: a single shard, C_d = C).
      total_classes: the real class count C when the last shards are padded
        (default n_devices·C_d); padding rows are sampled last, if at all.

    Returns:
      `PartialFCSample` (index, labels, num_valid).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from margin_jax import partial_fc_sample
      >>> s = partial_fc_sample(jnp.array([3, 7]), 100, rate=0.1, key=jax.random.key(0))
      >>> s.index.shape, bool(jnp.isin(jnp.array([3, 7]), s.index).all())
      ((10,), True)

    References:
      An et al., "Partial FC: Training 10 Million Identities on a Single
      Machine", ICCVW 2021, https://arxiv.org/abs/2010.05222
    """
    fn = "partial_fc_sample"
    if not 0.0 < float(rate) <= 1.0:
        raise ValueError(f"{fn}: `rate` must be in (0, 1], got {rate!r}.")
    _checks.check_rank(labels, 1, "labels", fn, "[b]")
    labels = jnp.asarray(labels)
    _checks.check_labels(
        labels, labels.shape[0], fn, ref="labels", ref_shape=labels.shape
    )
    batch = labels.shape[0]
    if axis_name is None:
        device, n_dev, all_labels = 0, 1, labels
    else:
        device = jax.lax.axis_index(axis_name)
        n_dev = jax.lax.axis_size(axis_name)
        all_labels = jax.lax.all_gather(labels, axis_name, tiled=True)
    total = n_dev * num_classes if total_classes is None else total_classes
    offset = device * num_classes
    valid_rows = jnp.clip(total - offset, 0, num_classes)
    if rate >= 1.0:
        num_sample = num_classes
    else:
        num_sample = min(num_classes, max(math.ceil(rate * num_classes), batch * n_dev))
    local = all_labels - offset
    owned = (local >= 0) & (local < num_classes)
    positive = (
        jnp.zeros((num_classes,), bool)
        .at[jnp.where(owned, local, num_classes)]
        .set(True, mode="drop")
    )
    rows = jnp.arange(num_classes)
    scores = jax.random.uniform(key, (num_classes,))
    scores = jnp.where(positive, 2.0, jnp.where(rows < valid_rows, scores, -1.0))
    index = jnp.sort(jax.lax.top_k(scores, num_sample)[1])
    position = jnp.searchsorted(index, jnp.clip(local, 0, num_classes - 1))
    remapped = jnp.where(owned, device * num_sample + position, 0)
    if axis_name is not None:
        remapped = jax.lax.psum(remapped, axis_name)
        remapped = jax.lax.dynamic_slice_in_dim(remapped, device * batch, batch)
    return PartialFCSample(index, remapped, jnp.minimum(num_sample, valid_rows))
