"""Margin softmax for millions of classes: class-chunked, class-sharded, Partial FC.

The dense form builds the logits [B, C]; at C = 10^6 that is 1 GB for B = 256
in float32, before its gradient. The two forms here compute the same loss
exactly, with the same `Stages` and the same composer (`margin_jax.composer`),
without ever holding more than one block [B, chunk] of logits:

* the target cosine c_y is computed once from the gathered target rows
  W[y] [B, D];
* the non-target gaps d_ij = s·(g(c_ij, f_i) - f_i) are reduced block by block
  into the partial cross-entropy sum (m, r) of `margin_jax.cross_entropy`
  (an online log-sum-exp), from which the composer takes the loss
  m + log1p(expm1(-m) + r), as in the dense form;
* the backward pass (a `jax.custom_vjp`) recomputes each block and accumulates
  dL/dx and dL/dW block by block.

Each block's cosines are x̂·wⱼ / ||wⱼ||: the product with the raw W scaled by
the inverse row norms, so no normalised copy of W [C, D] is ever written.

Peak memory is O(B·chunk) for the loss plus the O(C·D) of W and its gradient;
the default chunk is chosen from a memory budget (`default_chunk_size`).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from margin_jax import _checks, collective
from margin_jax.collective import varying_axes
from margin_jax.composer import Form, compose, resolve_stages, stage_gaps
from margin_jax.cosine import (
    clip_cosine,
    inverse_row_norms,
    l2_normalize,
    scaled_cosines,
)
from margin_jax.cross_entropy import combine_partials, gap_partials, reduce_partials

__all__ = [
    "chunked_margin_loss",
    "sharded_margin_loss",
    "partial_fc_sample",
    "PartialFCSample",
    "non_target_logsumexp",
    "default_chunk_size",
    "top1_classes",
    "MEMORY_BUDGET",
]

# Bytes the [B, chunk] blocks of one loss may take, per backend: about four such
# arrays are live at once in a backward block (cosines, gaps, probabilities,
# their VJP). On CPU the blocks should stay in cache: at B = 256, C = 100k the
# step is fastest at chunk 1024-2048 (8 MiB) and 1.35x slower at 8192; on an
# accelerator bigger blocks only save loop overhead (not measured here).
MEMORY_BUDGET = {"cpu": 8 * 2**20, "gpu": 256 * 2**20, "tpu": 256 * 2**20}
_LIVE_BLOCKS = 4


def default_chunk_size(batch: int, *, budget: int | None = None) -> int:
    """Classes per block so that the blocks of a batch of ``batch`` fit ``budget``.

    A multiple of 128, at least 128: budget / (4 arrays · 4 bytes · batch), the
    budget being ``MEMORY_BUDGET`` of the default backend unless given.

    Example:
      >>> from margin_jax import default_chunk_size
      >>> default_chunk_size(256, budget=8 * 2**20)  # 8 MiB / (4 · 4 B · 256)
      2048
    """
    if budget is None:
        budget = MEMORY_BUDGET.get(jax.default_backend(), MEMORY_BUDGET["gpu"])
    chunk = budget // (_LIVE_BLOCKS * 4 * max(int(batch), 1))
    return max(128, chunk // 128 * 128)


def _gap_fn(non_target_fn):
    """(x̂ [B, D], W block [n, D], f [B], s [B]) -> gaps s·(g(c, f) - f) [B, n]."""

    def gaps(x_hat, w_block, target, scale):
        cos = clip_cosine(scaled_cosines(x_hat, w_block))
        return stage_gaps(cos, target, scale, non_target_fn)

    return gaps


def _vary_like(x, *refs):
    """``x`` typed as varying over every shard_map axis some of ``refs`` vary over."""
    axes = frozenset().union(*(varying_axes(r) for r in refs)) - varying_axes(x)
    return jax.lax.pcast(x, tuple(sorted(axes)), to="varying") if axes else x


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


def _partials_forward(
    gap, chunk, x_hat, weights, target, scale, labels, offset, num_valid, consts
):
    num_rows = weights.shape[0]
    n_blocks = -(-num_rows // chunk)

    def body(k, carry):
        start = _block(k, chunk, num_rows)
        w_block = jax.lax.dynamic_slice_in_dim(weights, start, chunk)
        gaps = gap(x_hat, w_block, target, scale, *consts)
        mask = _block_mask(k, start, chunk, labels, offset, num_valid)
        return combine_partials(carry, gap_partials(gaps, mask))

    zeros = _zeros_like(target, x_hat, weights, scale)
    return jax.lax.fori_loop(0, n_blocks, body, (zeros, zeros))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _partials(
    gap, chunk, x_hat, weights, target, scale, labels, offset, num_valid, *consts
):
    return _partials_forward(
        gap, chunk, x_hat, weights, target, scale, labels, offset, num_valid, consts
    )


def _partials_fwd(
    gap, chunk, x_hat, weights, target, scale, labels, offset, num_valid, *consts
):
    top, rest = _partials_forward(
        gap, chunk, x_hat, weights, target, scale, labels, offset, num_valid, consts
    )
    residuals = (x_hat, weights, target, scale, labels, offset, num_valid, consts, top)
    return (top, rest), residuals


def _partials_bwd(gap, chunk, residuals, cotangents):
    # m is a shift without gradient: the loss m + log1p(expm1(-m) + r) does not
    # depend on it, so only r's cotangent flows, d r / d gap_ij = exp(gap_ij - m).
    x_hat, weights, target, scale, labels, offset, num_valid, consts, top = residuals
    cot = cotangents[1]
    num_rows = weights.shape[0]
    n_blocks = -(-num_rows // chunk)
    float_consts = [jnp.issubdtype(c.dtype, jnp.inexact) for c in consts]

    def body(k, carry):
        d_x, d_w, d_target, d_scale, d_consts = carry
        start = _block(k, chunk, num_rows)
        w_block = jax.lax.dynamic_slice_in_dim(weights, start, chunk)
        gaps, vjp = jax.vjp(gap, x_hat, w_block, target, scale, *consts)
        mask = _block_mask(k, start, chunk, labels, offset, num_valid)
        terms = jnp.exp(jnp.where(mask, gaps - top[:, None], 0.0))
        grads = vjp(jnp.where(mask, terms, 0.0) * cot[:, None])
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


_partials.defvjp(_partials_fwd, _partials_bwd)


def block_partials(
    x_hat,
    weights,
    target,
    scale,
    labels,
    *,
    non_target_fn=None,
    chunk_size: int,
    offset: ArrayLike = 0,
    num_valid: ArrayLike | None = None,
):
    """The partial (m, r) of the non-target gaps over the rows of ``weights``.

    Rows that count: index < ``num_valid`` and class (``offset`` + row) not the
    label. Blocks of ``chunk_size`` rows (clipped to N); the VJP recomputes
    each block.
    """
    chunk = int(min(chunk_size, weights.shape[0]))
    if num_valid is None:
        num_valid = weights.shape[0]
    # Under shard_map every float input must vary over the axes x̂ and W vary
    # over (a scale replicated on every device becomes one copy per device,
    # whose cotangents the cast's transpose sums back).
    target, scale = (_vary_like(a, x_hat, weights) for a in (target, scale))
    gap = _gap_fn(non_target_fn)
    converted, consts = jax.closure_convert(gap, x_hat, weights[:chunk], target, scale)
    return _partials(
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


def non_target_logsumexp(
    x_hat: jax.Array,
    weights: jax.Array,
    target: jax.Array,
    scale: jax.Array,
    labels: jax.Array,
    *,
    non_target_fn=None,
    chunk_size: int | None = None,
    offset: ArrayLike = 0,
    num_valid: ArrayLike | None = None,
) -> jax.Array:
    """lse_i = log Σ_j exp(s_i·(g(c_ij, f_i) - f_i)) over the rows j of ``weights``.

    The rows that count are those with index < ``num_valid`` whose class
    (``offset`` + row) is not the label. Computed in blocks of ``chunk_size`` rows
    (default `default_chunk_size`) with an online log-sum-exp; the VJP
    recomputes each block. -inf where no row counts.

    Args:
      x_hat: [B, D] normalised embeddings.
      weights: [N, D] class centres (raw; each block's cosines are scaled by the
        inverse row norms).
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
    if chunk_size is None:
        chunk_size = default_chunk_size(x_hat.shape[0])
    partials = block_partials(
        x_hat,
        weights,
        target,
        scale,
        labels,
        non_target_fn=non_target_fn,
        chunk_size=chunk_size,
        offset=offset,
        num_valid=num_valid,
    )
    return _lse_of(partials)


def _check_chunk(chunk_size, fn):
    if not _checks.is_int(chunk_size) or chunk_size < 1:
        raise ValueError(
            f"{fn}: `chunk_size` must be a positive int, got {chunk_size!r}."
        )


def _prepare(fn, embeddings, weights, labels, where, weights_layout, chunk_size):
    """Validated inputs in the compute dtype; x̂ of padded rows is zero."""
    _checks.check_embeddings_weights(
        embeddings, weights, fn, weights_layout=weights_layout
    )
    batch = np.shape(embeddings)[0]
    ref = dict(ref="embeddings", ref_shape=np.shape(embeddings))
    _checks.check_labels(labels, batch, fn, **ref)
    _checks.check_where(where, batch, fn, **ref)
    chunk = default_chunk_size(batch) if chunk_size is None else chunk_size
    _check_chunk(chunk, fn)
    embeddings, weights = jnp.asarray(embeddings), jnp.asarray(weights)
    dtype = _checks.compute_dtype(embeddings, weights)
    x = embeddings.astype(dtype)
    x_hat = l2_normalize(x)
    norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), -1), jnp.finfo(dtype).tiny))
    if where is not None:
        where = jnp.asarray(where)
        x_hat = jnp.where(where[:, None], x_hat, 0.0)
    return x_hat, norm, weights.astype(dtype), jnp.asarray(labels), where, chunk, dtype


def _target_cos(x_hat, target_rows):
    """c_y [B] from the gathered target rows W[y] [B, D]."""
    return jnp.sum(x_hat * target_rows, axis=-1) * inverse_row_norms(target_rows)


def _lse_of(partials):
    top, rest = partials
    return top + jnp.log(rest)


def chunked_margin_loss(
    embeddings: ArrayLike,
    weights: ArrayLike,
    labels: ArrayLike,
    *,
    stages=None,
    target_fn=None,
    non_target_fn=None,
    scale: ArrayLike | None = None,
    chunk_size: int | None = None,
    where: ArrayLike | None = None,
    axis_name=None,
):
    """Exact margin softmax over class blocks: never builds the logits [B, C].

    Equal in value and gradient (w.r.t. embeddings, weights, scale and traced
    hyperparameters) to ``margin_softmax_loss(cosine_logits(embeddings, weights),
    labels, stages=...)``, with peak memory O(B·chunk_size) for the loss instead
    of O(B·C). Any `Stages` runs, a registered one (``NAMED_STAGES``) or your own.

    Args:
      embeddings: [B, D] features (normalised inside).
      weights: [C, D] class centres (each row divided by its norm inside).
      labels: [B] integer labels in [0, C).
      stages: a `Stages`, or instead the stage keywords:
      target_fn: target stage, as for `margin_softmax_loss`.
      non_target_fn: optional elementwise non-target stage.
      scale: s, scalar or [B].
      chunk_size: classes per block (static int); C need not be a multiple, and
        C < chunk_size is one block. Default `default_chunk_size(B)`: the blocks
        then take about ``MEMORY_BUDGET`` of the backend (8 MiB on CPU, 256 MiB
        on an accelerator) whatever C.
      where: optional bool [B]; False rows give 0 and no gradient.
      axis_name: the device axis the batch statistics of ``stages`` cover (data
        parallel, W replicated).

    Returns:
      [B] per-example loss (float32 or wider); ``(loss, new_state)`` when
      ``stages.state`` is set.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import margin_jax as mj
      >>> x = jax.random.normal(jax.random.key(0), (4, 8))
      >>> w = jax.random.normal(jax.random.key(1), (1000, 8))
      >>> y = jnp.array([3, 999, 0, 512])
      >>> stages = mj.arcface_stages(margin=0.5, scale=64.0)
      >>> a = mj.chunked_margin_loss(x, w, y, stages=stages, chunk_size=96)
      >>> b = mj.margin_softmax_loss(mj.cosine_logits(x, w), y, stages=stages)
      >>> bool(jnp.allclose(a, b, rtol=1e-5))
      True
    """
    fn = "chunked_margin_loss"
    x_hat, norm, weights, labels, where, chunk, dtype = _prepare(
        fn, embeddings, weights, labels, where, "[C, D]", chunk_size
    )
    stages = resolve_stages(stages, target_fn, non_target_fn, scale, fn)
    num_classes = weights.shape[0]
    if _checks.is_concrete(labels):
        _checks.check_labels(
            labels,
            x_hat.shape[0],
            fn,
            num_classes=num_classes,
            ref="weights",
            ref_shape=weights.shape,
        )
    target_cos = clip_cosine(_target_cos(x_hat, jnp.take(weights, labels, axis=0)))

    def partials(target, s, g):
        return block_partials(
            x_hat, weights, target, s, labels, non_target_fn=g, chunk_size=chunk
        )

    def lse(s):
        return _lse_of(partials(jnp.zeros_like(s), s, None))

    form = Form(target_cos, partials, lse, num_classes, norm)
    return compose(stages, form, where=where, axis_name=axis_name, fn=fn, dtype=dtype)


def sharded_margin_loss(
    embeddings: ArrayLike,
    weights_shard: ArrayLike,
    labels: ArrayLike,
    *,
    axis_name: str,
    stages=None,
    target_fn=None,
    non_target_fn=None,
    scale: ArrayLike | None = None,
    chunk_size: int | None = None,
    where: ArrayLike | None = None,
    num_classes: int | None = None,
    num_valid: ArrayLike | None = None,
):
    """Margin softmax with W sharded by class over a device axis (model parallel).

    Call inside `jax.pmap` or `jax.shard_map`. Device d holds the classes
    [d·C_d, (d+1)·C_d) as ``weights_shard`` [C_d, D] and its own slice of the
    batch. Embeddings and labels are all-gathered; each device reduces the
    gaps of the global batch against its shard (block by block) into a partial
    cross-entropy sum, and the partials of all devices are combined; the
    composer then runs as in every form, on the global batch (so batch
    statistics and example weights see the whole batch). Returns the loss of
    the device's own rows.

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
      stages: a `Stages`, or the stage keywords ``target_fn``,
        ``non_target_fn``, ``scale`` as for `margin_softmax_loss` (a per-example
        scale is this device's [b]).
      chunk_size: block size inside each shard (default `default_chunk_size`
        of the global batch).
      where: optional bool [b].
      num_classes: the real class count C <= n_devices·C_d (default equal).
      num_valid: instead of ``num_classes``, this device's count of real rows
        (a prefix of the shard), e.g. `PartialFCSample.num_valid`.

    Returns:
      [b] per-example loss for this device's rows; ``(loss, new_state)`` when
      ``stages.state`` is set (the same state on every device).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import margin_jax as mj
      >>> n = jax.local_device_count()
      >>> x = jax.random.normal(jax.random.key(0), (n, 2, 8))       # [devices, b, D]
      >>> w = jax.random.normal(jax.random.key(1), (n, 5, 8))       # 5 classes each
      >>> y = jnp.arange(2 * n).reshape(n, 2) % (5 * n)
      >>> stages = mj.arcface_stages(margin=0.5, scale=64.0)
      >>> loss = jax.pmap(lambda x, w, y: mj.sharded_margin_loss(
      ...     x, w, y, axis_name="d", stages=stages), axis_name="d")(x, w, y)
      >>> dense = mj.arcface_loss(mj.cosine_logits(x.reshape(-1, 8), w.reshape(-1, 8)),
      ...                         y.reshape(-1))
      >>> bool(jnp.allclose(loss.reshape(-1), dense, rtol=1e-5))
      True
    """
    fn = "sharded_margin_loss"
    stages = resolve_stages(stages, target_fn, non_target_fn, scale, fn)
    local_batch = np.shape(embeddings)[0]
    n_dev = collective.axis_size(axis_name)
    x_hat, norm, weights_shard, labels, where, chunk, dtype = _prepare(
        fn,
        embeddings,
        weights_shard,
        labels,
        where,
        "[C_shard, D]",
        default_chunk_size(local_batch * n_dev) if chunk_size is None else chunk_size,
    )
    shard_rows = weights_shard.shape[0]
    offset = collective.axis_offset(shard_rows, axis_name)
    total_rows = n_dev * shard_rows
    if num_valid is None:
        num_classes = total_rows if num_classes is None else num_classes
        num_valid = jnp.clip(num_classes - offset, 0, shard_rows)
    elif num_classes is not None:
        raise ValueError(f"{fn}: give `num_classes` or `num_valid`, not both.")
    else:
        num_classes = total_rows  # Partial FC: the sampled rows of every device

    gather = functools.partial(collective.gather, axis_name=axis_name)
    if stages.scale is not None and jnp.ndim(stages.scale) == 1:  # this device's [b]
        local = _checks.scale_vector(stages.scale, local_batch, dtype, fn, where=where)
        stages = stages._replace(scale=gather(local))
    x_all, labels_all, norm_all = gather(x_hat), gather(labels), gather(norm)
    where_all = None if where is None else gather(where)

    # Target cosines: the device owning y_i contributes x̂_i · w_{y_i} / ||w_{y_i}||.
    local_labels = labels_all - offset
    owned = (local_labels >= 0) & (local_labels < shard_rows)
    rows = jnp.take(weights_shard, jnp.clip(local_labels, 0, shard_rows - 1), axis=0)
    part = jnp.where(owned, _target_cos(x_all, rows), 0.0)
    target_cos = clip_cosine(jnp.sum(collective.stack(part, axis_name), axis=0))

    def partials(target, s, g):
        top, rest = block_partials(
            x_all,
            weights_shard,
            target,
            s,
            labels_all,
            non_target_fn=g,
            chunk_size=min(chunk, shard_rows),
            offset=offset,
            num_valid=num_valid,
        )
        return reduce_partials(
            collective.stack(top, axis_name), collective.stack(rest, axis_name)
        )

    def lse(s):
        return _lse_of(partials(jnp.zeros_like(s), s, None))

    form = Form(target_cos, partials, lse, num_classes, norm_all)
    out = compose(stages, form, where=where_all, axis_name=None, fn=fn, dtype=dtype)
    loss, state = out if stages.state is not None else (out, None)
    loss = collective.local_rows(loss, local_batch, axis_name)
    return loss if state is None else (loss, state)


def top1_classes(
    embeddings: ArrayLike,
    weights: ArrayLike,
    *,
    chunk_size: int | None = None,
    axis_name=None,
    num_classes: int | None = None,
) -> jax.Array:
    """argmax_j cos(x_i, w_j) [B] over class blocks (never the whole [B, C]).

    The closed-set prediction of a classifier head at any class count: the
    same blocks and cosines (`margin_jax.cosine.scaled_cosines`) as the
    chunked loss, no gradient. With ``axis_name`` (class-sharded W),
    ``weights`` is this device's shard and the winner is taken over all
    devices for the whole all-gathered batch: the result is [B_global] of
    global labels, and rows with a global index >= ``num_classes`` (padding
    of the last shards) never win.

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import top1_classes
      >>> w = jnp.array([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
      >>> top1_classes(jnp.array([[0.1, 1.0], [-3.0, 0.2]]), w, chunk_size=2).tolist()
      [1, 2]
    """
    fn = "top1_classes"
    _checks.check_embeddings_weights(embeddings, weights, fn)
    dtype = _checks.compute_dtype(embeddings, weights)
    x = jax.lax.stop_gradient(l2_normalize(jnp.asarray(embeddings, dtype)))
    weights = jax.lax.stop_gradient(jnp.asarray(weights, dtype))
    x = collective.gather(x, axis_name)
    num_rows = weights.shape[0]
    chunk = default_chunk_size(x.shape[0]) if chunk_size is None else chunk_size
    _check_chunk(chunk, fn)
    chunk = min(chunk, num_rows)
    offset = collective.axis_offset(num_rows, axis_name)
    limit = offset + num_rows if num_classes is None else num_classes

    def body(k, carry):
        best, arg = carry
        start = _block(k, chunk, num_rows)
        block = jax.lax.dynamic_slice_in_dim(weights, start, chunk)
        cos = scaled_cosines(x, block)
        rows = offset + start + jax.lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
        cos = jnp.where(rows < limit, cos, -jnp.inf)
        block_best = jnp.max(cos, axis=-1)
        better = block_best > best
        return (
            jnp.where(better, block_best, best),
            jnp.where(better, start + jnp.argmax(cos, axis=-1), arg),
        )

    init = (
        _zeros_like(x[:, 0], x, weights) - jnp.inf,
        jnp.zeros(x.shape[:1], jnp.int32) + _zeros_like(x[:, 0], x).astype(jnp.int32),
    )
    best, arg = jax.lax.fori_loop(0, -(-num_rows // chunk), body, init)
    if axis_name is None:
        return arg
    bests = collective.stack(best, axis_name)
    args = collective.stack(arg + offset, axis_name)
    winner = jnp.argmax(bests, axis=0)
    return jnp.take_along_axis(args, winner[None], axis=0)[0]


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
    device = collective.axis_index(axis_name)
    n_dev = collective.axis_size(axis_name)
    all_labels = collective.gather(labels, axis_name)
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
    remapped = collective.psum_no_grad(remapped, axis_name)
    remapped = collective.local_rows(remapped, batch, axis_name)
    return PartialFCSample(index, remapped, jnp.minimum(num_sample, valid_rows))
