"""Stage 4, the non-target transforms g(c_k, f): support vectors, hard negatives.

A non-target stage maps the cosines [B, C] and the margined target logits
f(c_y) [B, 1] elementwise to new non-target logits [B, C]. The composer
(`margin_jax.margin_softmax_loss`) then writes f(c_y) into the target column, so
a stage never needs to exclude k = y itself; being elementwise, every stage also
runs in the class-chunked and class-sharded forms. Masks come from comparisons
of stop-gradient values and carry no gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from margin_jax import _checks
from margin_jax.cosine import target_mask

__all__ = [
    "support_vector_mask",
    "sv_non_target",
    "mv_non_target",
    "curricular_non_target",
    "eqm_non_target",
    "MV_MODES",
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
