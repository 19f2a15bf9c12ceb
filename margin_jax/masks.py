"""Non-target transforms (support vectors, hard negatives) and mining weights.

A non-target stage maps the cosines [B, C] and the margined target logits
f(c_y) [B, 1] elementwise to new non-target logits [B, C]. The composer
(`margin_jax.margin_softmax_loss`) then writes f(c_y) into the target column, so
a stage never needs to exclude k = y itself; being elementwise, every stage also
runs in the class-chunked and class-sharded forms. Masks come from comparisons
of stop-gradient values and carry no gradient.

Mining weights (focal, hard-example) act on per-example losses or logits and
compose with any margin softmax: e.g. ``focal_loss(margin_logits(...), labels)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from margin_jax import _checks, collective
from margin_jax.cosine import target_mask

__all__ = [
    "support_vector_mask",
    "sv_non_target",
    "mv_non_target",
    "curricular_non_target",
    "eqm_non_target",
    "focal_weight",
    "focal_weight_from_ce",
    "hard_mining_mask",
]

_sg = jax.lax.stop_gradient
MV_MODES = ("adaptive", "fixed")


def _hard(cos: jax.Array, target: ArrayLike) -> jax.Array:
    """I_ik = [c_ik > f(c_y)], strict, no gradient (k = y handled by the caller)."""
    return _sg(cos) > _sg(jnp.asarray(target))


def support_vector_mask(
    cos: ArrayLike, labels: ArrayLike, target: ArrayLike
) -> jax.Array:
    """Support vectors of SV-Softmax: I_ik = [c_ik > f(c_{y_i})] and k != y_i.

    Args:
      cos: [B, C] cosines.
      labels: [B] integer labels.
      target: [B] margined target logits f(c_y) (before scaling).

    Returns:
      bool [B, C]; no gradient.

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import support_vector_mask
      >>> cos = jnp.array([[0.5, 0.6, 0.1]])
      >>> support_vector_mask(cos, jnp.array([0]), jnp.array([0.15])).tolist()
      [[False, True, False]]
    """
    fn = "support_vector_mask"
    _checks.check_rank(cos, 2, "cos", fn, "[B, C]")
    cos = jnp.asarray(cos)
    _checks.check_labels(labels, cos.shape[0], fn, ref_shape=cos.shape)
    _checks.check_rank(target, 1, "target", fn, "[B]")
    return _hard(cos, jnp.asarray(target)[:, None]) & ~target_mask(labels, cos.shape[1])


def sv_non_target(
    cos: ArrayLike, target: ArrayLike, *, t: ArrayLike = 1.2
) -> jax.Array:
    """SV-Softmax: a support vector's logit c_k becomes t·c_k + t - 1 (t >= 1).

    Equivalently its term e^{s·c_k} is multiplied by h = exp(s(t-1)(c_k + 1)).
    t = 1 is the base loss.

    Args:
      cos: [B, C] cosines.
      target: [B, 1] margined target logits f(c_y).
      t: the indicator weight, default 1.2 (the authors' code).

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import sv_non_target
      >>> out = sv_non_target(jnp.array([[0.5, 0.1]]), jnp.array([[0.2]]), t=1.2)
      >>> [round(float(v), 4) for v in out[0]]
      [0.8, 0.1]

    References:
      Wang et al., "Support Vector Guided Softmax Loss for Face Recognition",
      arXiv 2018, https://arxiv.org/abs/1812.11317
    """
    cos = jnp.asarray(cos)
    t = jnp.asarray(t, cos.dtype)
    return jnp.where(_hard(cos, target), t * cos + t - 1.0, cos)


def mv_non_target(
    cos: ArrayLike, target: ArrayLike, *, t: ArrayLike = 0.2, mode: str = "adaptive"
) -> jax.Array:
    """MV-Softmax: mis-classified vectors c_k > f(c_y) get a larger logit.

    "fixed": c_k -> c_k + t; "adaptive": c_k -> (t + 1)·c_k + t, which is SV-Softmax
    with t_SV = t + 1. t = 0 is the base loss.

    Args:
      cos: [B, C] cosines.
      target: [B, 1] margined target logits.
      t: default 0.2 (FaceX-Zoo's MV-Softmax).
      mode: "adaptive" (default) or "fixed"; static.

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import mv_non_target
      >>> out = mv_non_target(jnp.array([[0.5]]), jnp.array([[0.2]]), mode="fixed")
      >>> round(float(out[0, 0]), 4)
      0.7

    References:
      Wang et al., "Mis-classified Vector Guided Softmax Loss for Face
      Recognition", AAAI 2020, https://arxiv.org/abs/1912.00833
    """
    if mode not in MV_MODES:
        raise ValueError(
            f"mv_non_target: `mode` must be one of {MV_MODES}, got {mode!r}."
        )
    cos = jnp.asarray(cos)
    t = jnp.asarray(t, cos.dtype)
    moved = cos + t if mode == "fixed" else (t + 1.0) * cos + t
    return jnp.where(_hard(cos, target), moved, cos)


def curricular_non_target(
    cos: ArrayLike, target: ArrayLike, *, t: ArrayLike
) -> jax.Array:
    """CurricularFace: hard negatives c_k > f(c_y) become c_k·(t + c_k).

    ``t`` (the EMA of the mean target cosine, see `margin_jax.curricularface_loss`)
    receives no gradient.

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import curricular_non_target
      >>> cos, target = jnp.array([[0.5, 0.1]]), jnp.array([[0.3]])
      >>> out = curricular_non_target(cos, target, t=0.2)
      >>> [round(float(v), 4) for v in out[0]]  # 0.5·(0.2 + 0.5); 0.1 is easy
      [0.35, 0.1]

    References:
      Huang et al., "CurricularFace: Adaptive Curriculum Learning Loss for Deep
      Face Recognition", CVPR 2020, https://arxiv.org/abs/2004.00288
    """
    cos = jnp.asarray(cos)
    t = _sg(jnp.asarray(t, cos.dtype))
    return jnp.where(_hard(cos, target), cos * (t + cos), cos)


def eqm_non_target(cos: ArrayLike, target: ArrayLike, *, t2: ArrayLike) -> jax.Array:
    """EqM non-target stage: c_j -> (c_j - t2)_+ (no gradient once c_j <= t2).

    ``target`` is unused (the stage does not depend on the target); it is in the
    signature so every non-target stage composes the same way.

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import eqm_non_target
      >>> out = eqm_non_target(jnp.array([[0.5, 0.1]]), None, t2=0.25)
      >>> [round(float(v), 4) for v in out[0]]
      [0.25, 0.0]
    """
    del target
    cos = jnp.asarray(cos)
    return jax.nn.relu(cos - jnp.asarray(t2, cos.dtype))


def _safe_pow(x: jax.Array, gamma: jax.Array) -> jax.Array:
    """x^γ for x >= 0 with 0^0 = 1 and a finite gradient at x = 0."""
    pos = x > 0
    safe_x = jnp.where(pos, x, 1.0)
    return jnp.where(pos, safe_x**gamma, jnp.where(gamma == 0, 1.0, 0.0))


def focal_weight(
    logits: ArrayLike, labels: ArrayLike, *, gamma: ArrayLike = 2.0
) -> jax.Array:
    """Focal-loss weight (1 - p_y)^γ from logits, computed stably.

    1 - p_y = -expm1(log p_y) with log p_y from log_softmax, so it is accurate
    when p_y is near 1 (where 1 - exp(...) would cancel). Differentiable.

    Args:
      logits: [B, C] (plain or margin logits).
      labels: [B].
      gamma: focusing parameter γ >= 0, default 2.

    Returns:
      [B] weights in [0, 1].

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import focal_weight
      >>> focal_weight(jnp.zeros((1, 2)), jnp.array([0])).tolist()  # (1 - 1/2)^2
      [0.25]
    """
    logits = jnp.asarray(logits)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    log_py = jnp.take_along_axis(log_p, jnp.asarray(labels)[:, None], axis=-1)[:, 0]
    return focal_weight_from_ce(-log_py, gamma=gamma)


def focal_weight_from_ce(ce: ArrayLike, *, gamma: ArrayLike = 2.0) -> jax.Array:
    """(1 - p_y)^γ from the cross-entropy ce = -log p_y [B]: no second pass.

    1 - p_y = -expm1(-ce), accurate when p_y is near 1.

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import focal_weight_from_ce
      >>> round(float(focal_weight_from_ce(jnp.log(2.0))), 6)  # p_y = 1/2
      0.25
    """
    ce = jnp.asarray(ce)
    one_minus_p = jnp.maximum(-jnp.expm1(-ce), 0.0)
    return _safe_pow(one_minus_p, jnp.asarray(gamma, ce.dtype))


def hard_mining_mask(
    losses: ArrayLike,
    *,
    keep_ratio: ArrayLike = 0.9,
    where: ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    """HM-Softmax: keep the ⌊r·n⌋ examples with the largest loss.

    n is the number of valid rows (``where``), over the whole named device axis
    when ``axis_name`` is set (the per-device masks then equal the single-device
    mask of the concatenated batch). Ties are broken by position: the earlier
    example is kept. No gradient.

    Args:
      losses: [B] per-example losses (e.g. cross-entropy).
      keep_ratio: r in [0, 1], default 0.9; may be traced.
      where: optional bool [B]; padded rows are never kept.
      axis_name: optional pmap / shard_map axis name (`margin_jax.collective`).

    Returns:
      bool [B].

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import hard_mining_mask
      >>> hard_mining_mask(jnp.array([0.1, 3.0, 2.0, 0.5]), keep_ratio=0.5).tolist()
      [False, True, True, False]
    """
    fn = "hard_mining_mask"
    _checks.check_rank(losses, 1, "losses", fn, "[B]")
    losses = _sg(jnp.asarray(losses))
    batch = losses.shape[0]
    _checks.check_where(where, batch, fn, ref="losses", ref_shape=losses.shape)
    valid = jnp.ones((batch,), bool) if where is None else jnp.asarray(where)
    # Ranks over the global batch; each device keeps its own rows of the mask.
    losses = collective.gather(losses, axis_name)
    valid = collective.gather(valid, axis_name)
    n = jnp.sum(valid).astype(jnp.float32)
    # + 1e-3 absorbs float rounding of r·n (e.g. 0.9 * 10 = 8.9999998 in float32).
    k = jnp.floor(jnp.asarray(keep_ratio, jnp.float32) * n + 1e-3)
    key = jnp.where(valid, losses, -jnp.inf)
    order = jnp.argsort(-key, stable=True)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
    keep = (rank < k) & valid
    return collective.local_rows(keep, batch, axis_name)
