"""The composer: one margin-softmax pipeline for the dense, chunked and sharded forms.

A form says how to get two things for its batch: the raw target cosines c_y
[B] and the partial cross-entropy sums (m, r) of the non-target gaps
d_ij = s_i·(g(c_ij, f_i) - f_i) (`margin_jax.cross_entropy`). The dense form
reads both from cos [B, C]; the class-chunked form from blocks of W
(`margin_jax.chunked`); the class-sharded form from each device's shard of W,
combined across devices. Everything else is here, once:

1. the batch statistics of the `Stages` (``stages.statistics``);
2. the target transform f(c_y) and the scale s;
3. the cross-entropy m + log1p(expm1(-m) + r) of the form's partials;
4. the per-example weight (``stages.example_fn``) and the ``where`` mask.

So any `Stages`, a registered one or a user's own, runs in every form.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from margin_jax import _checks
from margin_jax.cosine import take_target, target_mask
from margin_jax.cross_entropy import cross_entropy_from_partials, gap_partials
from margin_jax.stages import Batch, Stages

__all__ = ["Form", "compose", "dense_form", "resolve_stages", "stage_gaps"]

Partials = tuple[jax.Array, jax.Array]


class Form(NamedTuple):
    """How one form of the loss reads its batch (see the module docstring).

    Attributes:
      target_cos: [B] raw target cosines c_y, clipped to [-1, 1].
      partials: (f [B], s [B], non_target_fn) -> the partial (m, r) of the
        non-target gaps s·(g(c, f) - f) over every real class j ≠ y.
      non_target_logsumexp: s [B] -> [B] log Σ_{j≠y} exp(s·c_j).
      num_classes: C, the real classes.
      feature_norm: [B] ||x_i|| where the form has the embeddings, else None.
    """

    target_cos: jax.Array
    partials: Callable[[jax.Array, jax.Array, Any], Partials]
    non_target_logsumexp: Callable[[jax.Array], jax.Array]
    num_classes: int
    feature_norm: jax.Array | None = None


def resolve_stages(stages, target_fn, non_target_fn, scale, fn: str) -> Stages:
    """The `Stages` of a call given either ``stages=`` or the stage keywords."""
    if stages is None:
        if target_fn is None:
            raise TypeError(
                f"{fn}: give `stages` (e.g. margin_jax.arcface_stages()) or "
                "`target_fn` with `scale`."
            )
        return Stages(target_fn, non_target_fn, scale)
    if not isinstance(stages, Stages):
        raise TypeError(
            f"{fn}: `stages` must be a margin_jax.Stages (e.g. "
            f"margin_jax.NAMED_STAGES['arcface']()), got {type(stages).__name__}."
        )
    if target_fn is not None or non_target_fn is not None or scale is not None:
        raise TypeError(
            f"{fn}: give `stages` or the stage keywords (`target_fn`, "
            "`non_target_fn`, `scale`), not both."
        )
    return stages


def stage_gaps(cos, target, scale, non_target_fn):
    """s·(g(c, f) - f) [B, n]: the non-target gaps of one block of cosines."""
    z = cos if non_target_fn is None else non_target_fn(cos, target[:, None])
    return scale[:, None] * (z - target[:, None])


def compose(
    stages: Stages,
    form: Form,
    *,
    where,
    axis_name,
    fn: str,
    dtype,
):
    """The loss [B] of ``stages`` on ``form``; ``(loss, state)`` for a stateful loss."""
    batch = Batch(
        target_cos=form.target_cos,
        where=where,
        axis_name=axis_name,
        num_classes=form.num_classes,
        feature_norm=form.feature_norm,
        non_target_logsumexp=lambda s: form.non_target_logsumexp(
            _checks.scale_vector(s, form.target_cos.shape[0], dtype, fn, where=where)
        ),
    )
    if stages.statistics is not None:
        stages = stages.statistics(stages, batch)
    scale = stages.scale
    if scale is None:
        if form.feature_norm is None:
            raise ValueError(
                f"{fn}: these stages have scale=None (the per-example feature "
                "norm ||x_i||, SphereFace's original form): pass `feature_norm` "
                f"[B] = ({form.target_cos.shape[0]},) or stages with a scale."
            )
        scale = form.feature_norm
    scale = _checks.scale_vector(
        scale, form.target_cos.shape[0], dtype, fn, where=where
    )
    target = stages.target_fn(form.target_cos)
    loss = cross_entropy_from_partials(
        *form.partials(target, scale, stages.non_target_fn)
    )
    if stages.example_fn is not None:
        loss = stages.example_fn(loss, batch)
    if where is not None:
        loss = jnp.where(where, loss, 0.0)
    return loss if stages.state is None else (loss, stages.state)


def dense_form(cos: jax.Array, labels: jax.Array, feature_norm=None) -> Form:
    """The form of a cos [B, C] already in memory (validated, padded rows zeroed)."""
    others = ~target_mask(labels, cos.shape[1])

    def partials(target, scale, non_target_fn):
        return gap_partials(stage_gaps(cos, target, scale, non_target_fn), others)

    def non_target_logsumexp(scale):
        terms = jnp.where(others, scale[:, None] * cos, -jnp.inf)
        return jax.nn.logsumexp(terms, axis=-1)

    return Form(
        take_target(cos, labels),
        partials,
        non_target_logsumexp,
        cos.shape[1],
        feature_norm,
    )
