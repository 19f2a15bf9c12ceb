"""Per-example weights of the cross-entropy: focal and hard-example mining.

They act on the per-example losses (or logits) after the last stage and
compose with any margin softmax: as the ``example_fn`` of a `margin_jax.Stages`
(`margin_jax.focal_stages`, `margin_jax.hard_mining_stages`, any form), or on
logits, e.g. ``focal_loss(margin_logits(...), labels)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from margin_jax import _checks, collective
from margin_jax.cosine import take_target
from margin_jax.cross_entropy import cross_entropy_from_gaps

__all__ = ["focal_weight", "focal_weight_from_ce", "hard_mining_mask"]

_sg = jax.lax.stop_gradient


def _safe_pow(x: jax.Array, gamma: jax.Array) -> jax.Array:
    """x^γ for x >= 0 with 0^0 = 1 and a finite gradient at x = 0."""
    pos = x > 0
    safe_x = jnp.where(pos, x, 1.0)
    return jnp.where(pos, safe_x**gamma, jnp.where(gamma == 0, 1.0, 0.0))


def focal_weight(
    logits: ArrayLike, labels: ArrayLike, *, gamma: ArrayLike = 2.0
) -> jax.Array:
    """Focal-loss weight (1 - p_y)^γ from logits, computed stably.

    1 - p_y = -expm1(-CE) with the package's one cross-entropy
    (`margin_jax.cross_entropy`), so it is accurate when p_y is near 1 (where
    1 - exp(...) would cancel). Differentiable.

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
    logits = logits.astype(_checks.compute_dtype(logits))
    labels = jnp.asarray(labels)
    gaps = logits - take_target(logits, labels)[:, None]
    return focal_weight_from_ce(cross_entropy_from_gaps(gaps, labels), gamma=gamma)


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
