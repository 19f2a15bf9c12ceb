"""The last stage: the one cross-entropy of the package.

Every cross-entropy in margin_jax (the dense, chunked and sharded margin
softmaxes, plain softmax, focal, hard mining, n-pair, the two-head regulariser)
is ℓ = log(1 + Σ_{j≠y} exp(d_j)) of the gaps d_j = z_j - z_y, held as a
partial sum (m, r): m = max(0, max_{j≠y} d_j) without gradient and
r = Σ_{j≠y} exp(d_j - m). Partials of class blocks or of class shards combine
exactly (`combine_partials`), and the loss is m + log1p(expm1(-m) + r), so a
small loss keeps its relative precision: logsumexp(z) - z_y subtracts two
numbers near s = 64 and loses it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from margin_jax.cosine import target_mask

__all__ = [
    "cross_entropy_from_gaps",
    "cross_entropy_from_partials",
    "gap_partials",
    "combine_partials",
    "reduce_partials",
]


def gap_partials(gaps: jax.Array, counted: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(m, r) of the counted gaps [B, n] (``counted`` bool, broadcastable).

    m = max(0, max of the counted gaps) carries no gradient; r = Σ exp(d - m)
    over the counted columns. Masked before exp: an uncounted gap may be inf,
    and a masked inf would still turn the gradient into 0·inf = NaN.
    """
    gaps = jnp.where(counted, gaps, -jnp.inf)
    top = jax.lax.stop_gradient(jnp.max(gaps, axis=-1, initial=0.0))
    return top, jnp.sum(jnp.exp(gaps - top[:, None]), axis=-1)


def reduce_partials(tops: jax.Array, rests: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The partial of the union of disjoint column sets, stacked on axis 0.

    ``tops``, ``rests``: [n, B], the partials of n blocks or shards. The new m
    is their max (no gradient); each r is rescaled to it.
    """
    top = jax.lax.stop_gradient(jnp.max(tops, axis=0))
    return top, jnp.sum(rests * jnp.exp(tops - top[None]), axis=0)


def combine_partials(a, b) -> tuple[jax.Array, jax.Array]:
    """The partial of the union of two disjoint sets of columns (as
    `reduce_partials` of the two, without stacking them: the online loop's step).
    """
    (top_a, rest_a), (top_b, rest_b) = a, b
    top = jnp.maximum(top_a, top_b)
    return top, rest_a * jnp.exp(top_a - top) + rest_b * jnp.exp(top_b - top)


def cross_entropy_from_partials(top: jax.Array, rest: jax.Array) -> jax.Array:
    """log(1 + Σ_{j≠y} exp(d_j)) = m + log1p(expm1(-m) + r) from the partial (m, r)."""
    return top + jnp.log1p(jnp.expm1(-top) + rest)


def cross_entropy_from_gaps(gaps: jax.Array, labels: jax.Array) -> jax.Array:
    """CE = log(1 + Σ_{j≠y} exp(d_j)) from the gaps d_j = z_j - z_y [B, C].

    The target column of ``gaps`` is ignored; a gap of -inf is a column that
    does not count. Equal to logsumexp(z) - z_y, computed from the partial
    (m, r) of `gap_partials` so a small loss keeps its relative precision.

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax.cross_entropy import cross_entropy_from_gaps
      >>> ce = cross_entropy_from_gaps(jnp.array([[0.0, -1.0]]), jnp.array([0]))
      >>> round(float(ce[0]), 4)  # log(1 + e^-1)
      0.3133
    """
    counted = ~target_mask(labels, gaps.shape[-1])
    return cross_entropy_from_partials(*gap_partials(gaps, counted))
