"""Adaptive and stateful pieces: AdaCos scale, CurricularFace's running t.

State is explicit: it goes in and comes out as a NamedTuple pytree (optax's
init/update split), carried by the caller, never seen by an optimiser.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from margin_jax import _checks, collective
from margin_jax.cosine import safe_arccos, take_target, target_mask

__all__ = [
    "adacos_fixed_scale",
    "adacos_dynamic_scale",
    "CurricularState",
    "init_curricular_state",
    "update_curricular_state",
]

_sg = jax.lax.stop_gradient


def adacos_fixed_scale(num_classes: int) -> jax.Array:
    """AdaCos fixed scale s = sqrt(2)·ln(C - 1).

    Args:
      num_classes: C >= 3 (at C = 2 the formula gives s = 0).

    Example:
      >>> from margin_jax import adacos_fixed_scale
      >>> round(float(adacos_fixed_scale(10_001)), 4)
      13.0254

    References:
      Zhang et al., "AdaCos: Adaptively Scaling Cosine Logits for Effectively
      Learning Deep Face Representations", CVPR 2019,
      https://arxiv.org/abs/1905.00292
    """
    if not _checks.is_int(num_classes) or num_classes < 3:
        raise ValueError(
            "adacos_fixed_scale: `num_classes` must be an int >= 3, got "
            f"{num_classes!r}."
        )
    return jnp.sqrt(2.0) * jnp.log(jnp.float32(num_classes - 1))


def adacos_dynamic_scale(
    cos: ArrayLike,
    labels: ArrayLike,
    prev_scale: ArrayLike,
    *,
    where: ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    """AdaCos dynamic scale for this step, from the previous one (no gradient).

    B_avg = mean_i Σ_{k≠y_i} exp(s_prev·c_ik); θ_med = the lower median of the
    target angles θ_{i,y_i} (as torch.median); s_new = ln(B_avg) /
    cos(min(π/4, θ_med)). ln(B_avg) is computed as a log-sum-exp, so a large
    s_prev cannot overflow. Use s_new for this step's logits (`adacos_loss`) and
    carry it as the state for the next step; start from `adacos_fixed_scale`.

    Args:
      cos: [B, C] cosines.
      labels: [B] integer labels.
      prev_scale: scalar s_prev.
      where: optional bool [B]; padded rows are left out of both statistics.
      axis_name: optional device axis; the statistics then cover the whole
        global batch, equal to the single-device value on the concatenated batch.

    Returns:
      Scalar s_new (``prev_scale`` unchanged if no row is valid).

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import adacos_dynamic_scale
      >>> cos = jnp.array([[0.9, 0.1, -0.2], [0.0, 0.8, 0.3]])
      >>> s = adacos_dynamic_scale(cos, jnp.array([0, 1]), 1.7)
      >>> bool(s > 0)
      True

    References:
      Zhang et al., AdaCos, CVPR 2019, Algorithm 1, https://arxiv.org/abs/1905.00292
    """
    fn = "adacos_dynamic_scale"
    cos, labels, where = _checks.prepare_cos_labels(fn, cos, labels, where)
    cos = _sg(cos)
    s_prev = _sg(jnp.asarray(prev_scale, cos.dtype))
    others = ~target_mask(labels, cos.shape[1])
    log_terms = jax.nn.logsumexp(jnp.where(others, s_prev * cos, -jnp.inf), axis=-1)
    return adacos_scale_from_statistics(
        log_terms, take_target(cos, labels), s_prev, where=where, axis_name=axis_name
    )


def adacos_scale_from_statistics(
    log_terms: ArrayLike,
    target_cos: ArrayLike,
    prev_scale: ArrayLike,
    *,
    where: ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    """The AdaCos scale of `adacos_dynamic_scale` from per-row statistics.

    Args:
      log_terms: [B] log Σ_{k≠y_i} exp(s_prev·c_ik) per row (any form of the
        loss computes it: dense, class-chunked or class-sharded).
      target_cos: [B] target cosines c_{i,y_i}.
      prev_scale: scalar s_prev.
      where: optional bool [B].
      axis_name: optional device axis (statistics of the global batch).

    Returns:
      Scalar s_new, without gradient (``prev_scale`` if no row is valid).
    """
    log_terms, target_cos = _sg(jnp.asarray(log_terms)), _sg(jnp.asarray(target_cos))
    s_prev = _sg(jnp.asarray(prev_scale, log_terms.dtype))
    valid = jnp.ones(log_terms.shape, bool) if where is None else jnp.asarray(where)
    log_sum = jax.nn.logsumexp(jnp.where(valid, log_terms, -jnp.inf))
    theta = safe_arccos(target_cos)
    # The global log-sum-exp of the per-device ones; the median needs every
    # device's angles.
    log_sum = jax.nn.logsumexp(collective.gather(log_sum[None], axis_name))
    theta = collective.gather(theta, axis_name)
    valid = collective.gather(valid, axis_name)
    count = jnp.sum(valid)
    log_b_avg = log_sum - jnp.log(jnp.maximum(count, 1).astype(log_terms.dtype))
    lower_median = jnp.sort(jnp.where(valid, theta, jnp.inf))[
        jnp.maximum(count - 1, 0) // 2
    ]
    s_new = log_b_avg / jnp.cos(jnp.minimum(jnp.pi / 4, lower_median))
    return jnp.where(count > 0, s_new, s_prev)


class AdaCosState(NamedTuple):
    """Dynamic AdaCos's scale of the previous step (scalar; 0: not yet set)."""

    scale: jax.Array


def init_adacos_state(num_classes: int | None = None) -> AdaCosState:
    """The fixed scale of ``num_classes`` classes, or 0 (the first step then
    starts from the fixed scale of the loss's class count).

    Example:
      >>> from margin_jax import init_adacos_state
      >>> round(float(init_adacos_state(101).scale), 4)  # sqrt(2)·ln(100)
      6.5127
    """
    if num_classes is None:
        return AdaCosState(scale=jnp.zeros((), jnp.float32))
    return AdaCosState(scale=adacos_fixed_scale(num_classes))


class CurricularState(NamedTuple):
    """CurricularFace's running mean of the target cosine, t (scalar)."""

    t: jax.Array


def init_curricular_state() -> CurricularState:
    """t = 0, as the CurricularFace reference code starts.

    Example:
      >>> from margin_jax import init_curricular_state
      >>> float(init_curricular_state().t)
      0.0"""
    return CurricularState(t=jnp.zeros((), jnp.float32))


def update_curricular_state(
    state: CurricularState,
    target_cos: ArrayLike,
    *,
    momentum: ArrayLike = 0.99,
    where: ArrayLike | None = None,
    axis_name: str | None = None,
) -> CurricularState:
    """t <- (1 - momentum)·mean_i(c_{y_i}) + momentum·t, without gradient.

    Args:
      state: the previous `CurricularState`.
      target_cos: [B] raw (un-margined) target cosines.
      momentum: 0.99 as CurricularFace.
      where: optional bool [B] of valid rows.
      axis_name: mean over the whole device axis when set.

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_jax as mj
      >>> state = mj.update_curricular_state(mj.init_curricular_state(), jnp.ones(4))
      >>> round(float(state.t), 6)
      0.01
    """
    mean = collective.global_mean(
        _sg(jnp.asarray(target_cos)), where=where, axis_name=axis_name
    )
    t = (1.0 - momentum) * mean + momentum * jnp.asarray(state.t, mean.dtype)
    return CurricularState(t=t)
