"""A margin softmax as a value: its `Stages`, one factory per named loss, a registry.

Every margin softmax is one pipeline (docs/losses.md):

    normalise -> cos [B, C] -> target transform f(c_y) [B]
    -> non-target transform g(c_k, f) [B, C] -> CE(s·z, y), z_y = f, z_k = g

A `Stages` holds the parts that differ between losses: f, g, the scale s, and,
for the few losses that need them, the batch statistics of this step (the
AdaCos scale, CurricularFace's t) and a per-example weight of the CE (focal,
hard mining). The composer (`margin_jax.composer`) runs any `Stages` in each of
the three forms, with no per-form code:

* dense: ``margin_softmax_loss(cos, labels, stages=...)`` on cos [B, C];
* class-chunked: ``chunked_margin_loss(embeddings, weights, labels, stages=...)``;
* class-sharded: ``sharded_margin_loss(..., stages=...)`` inside pmap/shard_map.

``NAMED_STAGES`` maps each loss name to its factory; every named ``*_loss`` of
`margin_jax.losses` is its factory's stages through the composer, so the
defaults live here, once.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import margin_jax as mj
  >>> stages = mj.NAMED_STAGES["arcface"](margin=0.5, scale=64.0)
  >>> x = jax.random.normal(jax.random.key(0), (4, 8))
  >>> w = jax.random.normal(jax.random.key(1), (300, 8))
  >>> y = jnp.array([3, 299, 0, 150])
  >>> dense = mj.margin_softmax_loss(mj.cosine_logits(x, w), y, stages=stages)
  >>> chunked = mj.chunked_margin_loss(x, w, y, stages=stages, chunk_size=64)
  >>> bool(jnp.allclose(dense, chunked, rtol=1e-5))
  True
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from margin_jax.adaptive import (
    AdaCosState,
    CurricularState,
    adacos_fixed_scale,
    adacos_scale_from_statistics,
    init_adacos_state,
    init_curricular_state,
    update_curricular_state,
)  # fmt: skip
from margin_jax.example_weights import focal_weight_from_ce, hard_mining_mask
from margin_jax.non_targets import (
    MV_MODES,
    curricular_non_target,
    eqm_non_target,
    mv_non_target,
    sv_non_target,
)
from margin_jax.targets import (
    arcface_target,
    check_sphere_margin,
    combined_target,
    cosface_target,
    eqm_target,
    normface_target,
    sphereface_target,
)
from margin_jax.targets import straight_through as _straight_through

__all__ = [
    "Stages",
    "Batch",
    "NAMED_STAGES",
    "MARGIN_TYPES",
    "margin_target_fn",
    "normface_stages",
    "cosface_stages",
    "arcface_stages",
    "combined_stages",
    "sphereface_stages",
    "adacos_stages",
    "adacos_fixed_stages",
    "sv_softmax_stages",
    "mv_softmax_stages",
    "eqm_stages",
    "curricularface_stages",
    "focal_stages",
    "hard_mining_stages",
]

TargetFn = Callable[[jax.Array], jax.Array]
NonTargetFn = Callable[[jax.Array, jax.Array], jax.Array]
MARGIN_TYPES = ("none", "cosface", "arcface")


class Batch(NamedTuple):
    """What the batch-statistics and example stages of a `Stages` see.

    The same in every form: in the sharded form the batch is the global one
    (all-gathered) and ``axis_name`` is None, in the dense and chunked forms it
    is the device's batch and ``axis_name`` spans the devices.

    Attributes:
      target_cos: [B] raw target cosines c_y (clipped, with gradient).
      where: bool [B] of real rows, or None.
      axis_name: the device axis the statistics must cover, or None.
      num_classes: C, the number of real classes.
      feature_norm: [B] ||x_i|| when the form has embeddings, else what the
        caller passed (None if nothing).
      non_target_logsumexp: scale [B] -> [B] log Σ_{j≠y} exp(s_i·c_ij), the
        un-margined non-target terms (one more pass over the classes; only
        AdaCos asks for it).
    """

    target_cos: jax.Array
    where: jax.Array | None
    axis_name: Any
    num_classes: int
    feature_norm: jax.Array | None
    non_target_logsumexp: Callable[[jax.Array], jax.Array]


class Stages(NamedTuple):
    """The stages of a margin softmax, run by the composer in any form.

    Attributes:
      target_fn: target transform, c_y [B] -> f(c_y) [B] (`margin_jax.targets`).
      non_target_fn: optional non-target transform, elementwise, (cos [B, C],
        f [B, 1]) -> [B, C] (`margin_jax.non_targets`); its target column is ignored.
      scale: s, a scalar or per-example [B]; None for the per-example feature
        norm ||x_i|| (SphereFace's original form).
      statistics: optional (stages, `Batch`) -> stages for this step: computes
        the batch statistics the loss needs (over ``Batch.axis_name``) and
        returns the stages with them bound, and the new ``state``.
      example_fn: optional (ce [B], `Batch`) -> [B], a per-example weight of
        the cross-entropy (focal, hard mining).
      state: the loss state that ``statistics`` updates (None: stateless).
        When it is set, every form returns ``(loss, new_state)``.
    """

    target_fn: TargetFn = normface_target
    non_target_fn: NonTargetFn | None = None
    scale: Any = 64.0
    statistics: Callable[[Stages, Batch], Stages] | None = None
    example_fn: Callable[[jax.Array, Batch], jax.Array] | None = None
    state: Any = None


def margin_target_fn(margin_type: str, margin: ArrayLike, *, fn: str) -> TargetFn:
    """The base target stage of SV / MV losses: 'none', 'cosface' or 'arcface'."""
    if margin_type == "none":
        return normface_target
    if margin_type == "cosface":
        return functools.partial(cosface_target, margin=margin)
    if margin_type == "arcface":
        return functools.partial(arcface_target, margin=margin)
    raise ValueError(
        f"{fn}: `margin_type` must be one of {MARGIN_TYPES}, got {margin_type!r}."
    )


def normface_stages(*, scale: ArrayLike = 64.0) -> Stages:
    """NormFace: f(c) = c, no margin, s = 64 (see `margin_jax.normface_loss`)."""
    return Stages(normface_target, None, scale)


def cosface_stages(*, scale: ArrayLike = 64.0, margin: ArrayLike = 0.35) -> Stages:
    """CosFace / AM-Softmax: f(c) = c - m (see `margin_jax.cosface_loss`)."""
    return Stages(functools.partial(cosface_target, margin=margin), None, scale)


def arcface_stages(
    *,
    scale: ArrayLike = 64.0,
    margin: ArrayLike = 0.5,
    easy_margin: bool = False,
    straight_through: bool = False,
) -> Stages:
    """ArcFace: f(c) = cos(θ + m) (see `margin_jax.arcface_loss`)."""
    target = functools.partial(arcface_target, margin=margin, easy_margin=easy_margin)
    return Stages(
        _straight_through(target) if straight_through else target, None, scale
    )


def combined_stages(
    *,
    scale: ArrayLike = 64.0,
    m1: ArrayLike = 1.0,
    m2: ArrayLike = 0.3,
    m3: ArrayLike = 0.2,
) -> Stages:
    """Combined margin: f(c) = cos(m1·θ + m2) - m3 (see `combined_margin_loss`)."""
    return Stages(functools.partial(combined_target, m1=m1, m2=m2, m3=m3), None, scale)


def sphereface_stages(
    *, scale: ArrayLike | None = 64.0, margin: int = 4, lambda_: ArrayLike = 0.0
) -> Stages:
    """SphereFace: f(c) = (λ·c + ψ(θ)) / (1 + λ) (see `margin_jax.sphereface_loss`).

    ``scale=None`` is the original form: the per-example scale is the feature
    norm ||x_i|| (the chunked and sharded forms take it from the embeddings; the
    dense form needs ``feature_norm=``).
    """
    check_sphere_margin(margin, "sphereface_stages")
    target = functools.partial(sphereface_target, margin=margin, lambda_=lambda_)
    return Stages(target, None, scale)


def _adacos_fixed_statistics(stages: Stages, batch: Batch) -> Stages:
    return stages._replace(scale=adacos_fixed_scale(batch.num_classes))


def adacos_fixed_stages() -> Stages:
    """Fixed AdaCos: NormFace with s = sqrt(2)·ln(C - 1) from the class count."""
    return Stages(normface_target, None, None, statistics=_adacos_fixed_statistics)


def _adacos_statistics(stages: Stages, batch: Batch) -> Stages:
    prev = stages.state.scale
    # A state of 0 (`init_adacos_state()` without C) starts from the fixed scale.
    prev = jnp.where(prev > 0, prev, adacos_fixed_scale(max(batch.num_classes, 3)))
    prev = jax.lax.stop_gradient(prev)
    log_terms = batch.non_target_logsumexp(prev)
    scale = adacos_scale_from_statistics(
        log_terms, batch.target_cos, prev, where=batch.where, axis_name=batch.axis_name
    )
    return stages._replace(scale=jax.lax.stop_gradient(scale), state=AdaCosState(scale))


def adacos_stages(*, state: AdaCosState | None = None) -> Stages:
    """Dynamic AdaCos: NormFace with this step's scale from the batch (no gradient).

    The new scale is computed from ``state.scale`` (`adacos_dynamic_scale`,
    over the device axis) and returned as the new state.
    """
    state = init_adacos_state() if state is None else state
    return Stages(normface_target, None, None, _adacos_statistics, state=state)


def sv_softmax_stages(
    *,
    scale: ArrayLike = 32.0,
    t: ArrayLike = 1.2,
    margin_type: str = "none",
    margin: ArrayLike = 0.0,
) -> Stages:
    """SV-Softmax, SV-AM, SV-Arc (see `margin_jax.sv_softmax_loss`)."""
    target = margin_target_fn(margin_type, margin, fn="sv_softmax_stages")
    return Stages(target, functools.partial(sv_non_target, t=t), scale)


def mv_softmax_stages(
    *,
    scale: ArrayLike = 32.0,
    t: ArrayLike = 0.2,
    margin_type: str = "cosface",
    margin: ArrayLike = 0.35,
    mode: str = "adaptive",
) -> Stages:
    """MV-Softmax, MV-AM / MV-Arc (see `margin_jax.mv_softmax_loss`)."""
    target = margin_target_fn(margin_type, margin, fn="mv_softmax_stages")
    if mode not in MV_MODES:
        raise ValueError(
            f"mv_softmax_stages: `mode` must be one of {MV_MODES}, got {mode!r}."
        )
    return Stages(target, functools.partial(mv_non_target, t=t, mode=mode), scale)


def eqm_stages(
    *, scale: ArrayLike = 64.0, t1: ArrayLike = 0.6, t2: ArrayLike = 0.25
) -> Stages:
    """EqM (reconstruction): f = -(t1 - c)_+, g = (c - t2)_+ (see `eqm_loss`).

    `margin_jax.eqm_loss` requires all three hyperparameters (the paper gives
    no defaults); the factory defaults to the suggested ones (t1 - t2 = 0.35,
    s = 64) so that ``NAMED_STAGES["eqm"]()`` builds, like every entry.
    """
    return Stages(
        functools.partial(eqm_target, t1=t1),
        functools.partial(eqm_non_target, t2=t2),
        scale,
    )


def _curricular_statistics(stages: Stages, batch: Batch) -> Stages:
    state = update_curricular_state(
        stages.state, batch.target_cos, where=batch.where, axis_name=batch.axis_name
    )
    return stages._replace(
        non_target_fn=functools.partial(curricular_non_target, t=state.t), state=state
    )


def curricularface_stages(
    *,
    scale: ArrayLike = 64.0,
    margin: ArrayLike = 0.5,
    state: CurricularState | None = None,
) -> Stages:
    """CurricularFace: ArcFace target, hard negatives c_k·(t + c_k), t an EMA.

    This step's t is computed from the batch (over the device axis) and used in
    this same step, as in the authors' code; it is the new state.
    """
    state = init_curricular_state() if state is None else state
    target = functools.partial(arcface_target, margin=margin)
    return Stages(target, None, scale, _curricular_statistics, state=state)


def focal_stages(
    *, scale: ArrayLike = 64.0, margin: ArrayLike = 0.0, gamma: ArrayLike = 2.0
) -> Stages:
    """Focal loss (1 - p_y)^γ·CE on ArcFace logits (margin 0: on s·cos)."""

    def focal(ce, batch):
        del batch
        return focal_weight_from_ce(ce, gamma=gamma) * ce

    target = functools.partial(arcface_target, margin=margin)
    return Stages(target, None, scale, example_fn=focal)


def hard_mining_stages(
    *, scale: ArrayLike = 64.0, margin: ArrayLike = 0.0, keep_ratio: ArrayLike = 0.9
) -> Stages:
    """HM-Softmax on ArcFace logits: CE of the ⌊r·B⌋ hardest rows of the batch."""

    def hard(ce, batch):
        keep = hard_mining_mask(
            ce, keep_ratio=keep_ratio, where=batch.where, axis_name=batch.axis_name
        )
        return jnp.where(keep, ce, 0.0)

    target = functools.partial(arcface_target, margin=margin)
    return Stages(target, None, scale, example_fn=hard)


NAMED_STAGES: Mapping[str, Callable[..., Stages]] = {
    "normface": normface_stages,
    "cosface": cosface_stages,
    "arcface": arcface_stages,
    "combined": combined_stages,
    "sphereface": sphereface_stages,
    "adacos": adacos_stages,
    "adacos_fixed": adacos_fixed_stages,
    "curricularface": curricularface_stages,
    "sv_softmax": sv_softmax_stages,
    "mv_softmax": mv_softmax_stages,
    "eqm": eqm_stages,
    "focal": focal_stages,
    "hard_mining": hard_mining_stages,
}
