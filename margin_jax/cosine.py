"""Normalisation, cosine logits and the target column.

The first stage of every margin softmax: L2-normalise embeddings and class
centres, take their cosines, and read or write the target column ``c_{i, y_i}``.
Also the numerically safe ``sin θ`` and ``θ`` of a cosine used by the angular
margins (never a sqrt or arccos of an unclipped cosine).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from margin_jax import _checks

__all__ = [
    "l2_normalize",
    "cosine_logits",
    "take_target",
    "put_target",
    "target_mask",
    "safe_sin",
    "safe_arccos",
    "normalize_rows_fast",
    "inverse_row_norms",
    "scaled_cosines",
]

# 1 - c² below this counts as zero: sin θ is then exactly 0 with zero derivative.
_SIN_EPS = 1e-12


def l2_normalize(x: ArrayLike, *, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """Scales ``x`` to unit L2 norm along ``axis``.

    x̂ = x / max(||x||, eps). If some squared norm over- or underflows (or a row
    is zero), x is first divided by max|x| (without gradient; the result does
    not depend on it), so that norms from 1e-30 to 1e30 normalise exactly in
    float32; otherwise a single pass x·rsqrt(Σx²) is taken.

    Args:
      x: array of any shape, e.g. embeddings [B, D] or class centres [C, D].
      axis: the axis to normalise.
      eps: guards the zero vector, which maps to zero.

    Returns:
      Array of ``x``'s shape in the compute dtype (at least float32).

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import l2_normalize
      >>> [round(float(v), 4) for v in l2_normalize(jnp.array([3.0, 4.0]))]
      [0.6, 0.8]

    Differs from ``torch.nn.functional.normalize``: there a vector with norm
    below eps is divided by eps; here only the zero vector is special.
    """
    _checks.check_floating(x, "x", "l2_normalize")
    x = jnp.asarray(x, _checks.compute_dtype(x))
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    # One pass in the common case; the rescaled pass only when some norm² over-
    # or underflows (or a row is zero). lax.cond runs one branch, not both.
    tiny = jnp.finfo(x.dtype).tiny / jnp.finfo(x.dtype).eps
    ordinary = jnp.all(jnp.isfinite(sq) & (sq > tiny))
    return jax.lax.cond(
        ordinary,
        lambda x, sq: x * jax.lax.rsqrt(sq),
        lambda x, sq: _rescaled_normalize(x, axis, eps),
        x,
        sq,
    )


def inverse_row_norms(x: jax.Array, *, eps: float = 1e-12) -> jax.Array:
    """1 / max(||x_j||, eps) of each row of x [..., D], in one fused pass.

    For class centres W [C, D], the largest array a margin loss touches: the
    cosines are x̂·wⱼ scaled by this [C] vector, so no normalised copy of W is
    written, forward or backward. Exact for row norms between 1e-12 and 1e18 in
    float32 (below eps = 1e-12 a row is divided by eps, as torch does; above,
    ||w||² overflows).
    """
    sq = jnp.sum(jnp.square(x), axis=-1)
    return jax.lax.rsqrt(jnp.maximum(sq, jnp.square(eps)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def scaled_cosines(x_hat: jax.Array, weights: jax.Array, eps: float = 1e-12):
    """x̂_i·wⱼ / max(||wⱼ||, eps) [B, C] for unit rows x̂ [B, D] and raw W [C, D].

    Not clipped (see `cosine_logits`). The VJP is written out: with
    H = G·diag(r) and P = Hᵀx̂ [C, D], dL/dx̂ = H·W and dL/dwⱼ = Pⱼ - rⱼ²(wⱼ·Pⱼ)wⱼ,
    the second term being the derivative of rⱼ = 1/||wⱼ||. Left to autodiff,
    that term is a column sum Σ_i G_ij·c_ij over [B, C], which XLA's CPU
    backend runs at about half the cost of the whole softmax step (C = 100k);
    as a row product of [C, D] arrays it costs a few per cent. Reverse mode
    only (no `jax.jvp`).
    """
    return (x_hat @ weights.T) * inverse_row_norms(weights, eps=eps)[None, :]


def _scaled_cosines_fwd(x_hat, weights, eps):
    r = inverse_row_norms(weights, eps=eps)
    return (x_hat @ weights.T) * r[None, :], (x_hat, weights, r)


def _scaled_cosines_bwd(eps, residuals, g):
    x_hat, weights, r = residuals
    h = g * r[None, :]
    p = h.T @ x_hat
    # Below eps the norm is the constant eps: r has no derivative there.
    r_live = jnp.where(r < 1.0 / eps, r, 0.0)
    along = jnp.square(r_live) * jnp.sum(weights * p, axis=-1)
    return h @ weights, p - along[:, None] * weights


scaled_cosines.defvjp(_scaled_cosines_fwd, _scaled_cosines_bwd)


def normalize_rows_fast(x: jax.Array, *, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) along the last axis in one fused pass.

    The robust `l2_normalize` costs a branch that blocks XLA's fusion; this is
    `inverse_row_norms` applied to the rows.
    """
    return x * inverse_row_norms(x, eps=eps)[..., None]


def _rescaled_normalize(x: jax.Array, axis: int, eps: float) -> jax.Array:
    """x / ||x|| after dividing by max|x| (no gradient; the result is invariant)."""
    peak = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=axis, keepdims=True))
    x = x / jnp.where(peak > 0, peak, 1.0)
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, jnp.square(eps)))


def cosine_logits(embeddings: ArrayLike, weights: ArrayLike) -> jax.Array:
    """Cosine of every embedding with every class centre, c_ij = x̂_i · ŵ_j.

    Both arguments are L2-normalised and the result is clipped to [-1, 1]
    (rounding can leave it just outside); the clip passes the gradient for
    values inside [-1, 1], boundaries included. Embeddings go through the robust
    `l2_normalize` (any norm from 1e-30 to 1e30). The class centres, the big
    array, are not copied: the product x̂·Wᵀ is scaled by `inverse_row_norms`
    (row norms 1e-12 to 1e18 in float32, far beyond what training produces),
    which keeps the margin losses at about the cost of plain softmax on x·Wᵀ.

    Args:
      embeddings: [B, D] features x_i.
      weights: [C, D] class centres W (one row per class, as insightface's
        Partial FC and FaceX-Zoo store them; PML stores [D, C]).

    Returns:
      [B, C] cosines in the compute dtype (float32 for bf16/fp16 input).

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import cosine_logits
      >>> cosine_logits(jnp.array([[1.0, 0.0]]), jnp.array([[2.0, 0.0], [0.0, 3.0]]))
      Array([[1., 0.]], dtype=float32)
    """
    _checks.check_embeddings_weights(embeddings, weights, "cosine_logits")
    dtype = _checks.compute_dtype(embeddings, weights)
    x = l2_normalize(jnp.asarray(embeddings, dtype))
    return clip_cosine(scaled_cosines(x, jnp.asarray(weights, dtype)))


def clip_cosine(cos: jax.Array) -> jax.Array:
    """Clips to [-1, 1]; gradient 1 inside (boundaries included), 0 outside."""
    return jnp.where(cos > 1, 1.0, jnp.where(cos < -1, -1.0, cos)).astype(cos.dtype)


def take_target(cos: ArrayLike, labels: ArrayLike) -> jax.Array:
    """The target column c_{i, y_i}: [B, C], [B] -> [B].

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import take_target
      >>> take_target(jnp.array([[0.1, 0.9], [0.7, 0.2]]), jnp.array([1, 0])).tolist()
      [0.8999999761581421, 0.699999988079071]"""
    cos = jnp.asarray(cos)
    return jnp.take_along_axis(cos, jnp.asarray(labels)[:, None], axis=-1)[:, 0]


def target_mask(
    labels: ArrayLike, num_classes: int, offset: ArrayLike = 0
) -> jax.Array:
    """Boolean one-hot [B, num_classes]: column j is the target of row i.

    ``offset`` is the class index of column 0, for blocks of columns.

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import target_mask
      >>> target_mask(jnp.array([2, 0]), 3).tolist()
      [[False, False, True], [True, False, False]]
    """
    cols = jax.lax.broadcasted_iota(jnp.int32, (1, num_classes), 1) + offset
    return jnp.asarray(labels)[:, None] == cols


def put_target(cos: ArrayLike, labels: ArrayLike, values: ArrayLike) -> jax.Array:
    """Writes ``values`` [B] into the target column of ``cos`` [B, C].

    A select, not a scatter: fuses with the elementwise stages around it, and the
    gradient flows to ``values`` at the target and to ``cos`` everywhere else.

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import put_target
      >>> put_target(jnp.zeros((1, 3)), jnp.array([1]), jnp.array([5.0])).tolist()
      [[0.0, 5.0, 0.0]]
    """
    cos = jnp.asarray(cos)
    mask = target_mask(labels, cos.shape[-1])
    return jnp.where(mask, jnp.asarray(values, cos.dtype)[:, None], cos)


def safe_sin(c: ArrayLike) -> jax.Array:
    """sin θ = sqrt(1 - c²) for c = cos θ, finite gradient at c = ±1.

    1 - c² is clipped to >= 0; where it is <= 1e-12 the result is exactly 0 and
    so is its derivative ("double where": the branch not taken sees a harmless
    argument, so no NaN or inf leaks into the gradient).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from margin_jax import safe_sin
      >>> round(float(safe_sin(jnp.array(0.6))), 6), abs(float(jax.grad(safe_sin)(1.0)))
      (0.8, 0.0)
    """
    c = jnp.asarray(c)
    u = 1.0 - jnp.square(c)
    ok = u > _SIN_EPS
    return jnp.where(ok, jnp.sqrt(jnp.where(ok, u, 1.0)), 0.0)


def safe_arccos(c: ArrayLike) -> jax.Array:
    """θ = arccos(c) in [0, π] as atan2(sin θ, c), finite gradient at c = ±1.

    More accurate than arccos near ±1 and never differentiates arccos at its
    singularities; ``c`` is clipped to [-1, 1] first.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from margin_jax import safe_arccos
      >>> theta, grad = safe_arccos(jnp.array(-1.0)), jax.grad(safe_arccos)(1.0)
      >>> round(float(theta), 6), abs(float(grad))
      (3.141593, 0.0)
    """
    c = jnp.clip(jnp.asarray(c), -1.0, 1.0)
    return jnp.arctan2(safe_sin(c), c)
