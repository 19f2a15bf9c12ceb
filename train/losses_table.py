"""The loss table: config name -> margin_jax loss, with its state and defaults.

Every entry has the same signature,

    fn(inputs: LossInputs, state, *, step, axis_name, **hyperparameters)
        -> (per-example loss [B], new state)

so the train step never branches on the loss. ``state`` is the loss's own
pytree carried in the train state (AdaCos scale, CurricularFace t, ...; an
empty dict for stateless losses); ``step`` drives schedules (SphereFace λ);
``axis_name`` is the pmap device axis, passed to every margin_jax function
that takes batch statistics. Hyperparameters come from ``config.loss`` (every
key but ``name``) and are checked against the function's signature, so a typo
fails before training with the list of valid names.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

import margin_jax as mj

__all__ = ["LOSSES", "LossInputs", "LossSpec", "get_loss", "loss_hyperparameters"]


class LossInputs(NamedTuple):
    """What the model gives a loss: embeddings [B, D], class weights W [C, D]."""

    embeddings: jax.Array
    weights: jax.Array
    labels: jax.Array


def _cos(inputs: LossInputs) -> jax.Array:
    return mj.cosine_logits(inputs.embeddings, inputs.weights)


def _no_state(num_classes: int) -> dict:
    del num_classes
    return {}


def softmax(inputs, state, *, step, axis_name):
    """Plain softmax CE on unnormalised logits x·Wᵀ (no bias)."""
    del step, axis_name
    logits = inputs.embeddings @ inputs.weights.T
    return mj.softmax_loss(logits, inputs.labels), state


def normface(inputs, state, *, step, axis_name, scale=16.0):
    del step, axis_name
    return mj.normface_loss(_cos(inputs), inputs.labels, scale=scale), state


def cosface(inputs, state, *, step, axis_name, scale=16.0, margin=0.35):
    del step, axis_name
    loss = mj.cosface_loss(_cos(inputs), inputs.labels, scale=scale, margin=margin)
    return loss, state


def arcface(
    inputs,
    state,
    *,
    step,
    axis_name,
    scale=16.0,
    margin=0.5,
    easy_margin=False,
    straight_through=False,
):
    del step, axis_name
    loss = mj.arcface_loss(
        _cos(inputs),
        inputs.labels,
        scale=scale,
        margin=margin,
        easy_margin=easy_margin,
        straight_through=straight_through,
    )
    return loss, state


def combined(inputs, state, *, step, axis_name, scale=16.0, m1=1.0, m2=0.3, m3=0.2):
    del step, axis_name
    loss = mj.combined_margin_loss(
        _cos(inputs), inputs.labels, scale=scale, m1=m1, m2=m2, m3=m3
    )
    return loss, state


def sphereface(
    inputs,
    state,
    *,
    step,
    axis_name,
    margin=4,
    base=1000.0,
    gamma=0.12,
    power=1.0,
    lambda_min=5.0,
    scale=0.0,
):
    """SphereFace with λ annealed from the step; ``scale`` 0 = original form."""
    del axis_name
    lambda_ = mj.sphereface_lambda(
        step, base=base, gamma=gamma, power=power, lambda_min=lambda_min
    )
    if scale:
        norm_kwargs = {"scale": scale}
    else:
        norm_kwargs = {"feature_norm": jnp.linalg.norm(inputs.embeddings, axis=-1)}
    loss = mj.sphereface_loss(
        _cos(inputs), inputs.labels, margin=margin, lambda_=lambda_, **norm_kwargs
    )
    return loss, state


def adacos(inputs, state, *, step, axis_name):
    """Dynamic AdaCos: the scale is state, updated over the whole device axis."""
    del step
    cos = _cos(inputs)
    scale = mj.adacos_dynamic_scale(
        cos, inputs.labels, state["scale"], axis_name=axis_name
    )
    return mj.adacos_loss(cos, inputs.labels, scale=scale), {"scale": scale}


def _adacos_state(num_classes: int) -> dict:
    return {"scale": mj.adacos_fixed_scale(max(num_classes, 3))}


def adacos_fixed(inputs, state, *, step, axis_name):
    del step, axis_name
    scale = mj.adacos_fixed_scale(max(inputs.weights.shape[0], 3))
    return mj.adacos_loss(_cos(inputs), inputs.labels, scale=scale), state


def curricularface(inputs, state, *, step, axis_name, scale=16.0, margin=0.5):
    del step
    return mj.curricularface_loss(
        _cos(inputs),
        inputs.labels,
        state,
        scale=scale,
        margin=margin,
        axis_name=axis_name,
    )


def _curricular_state(num_classes: int):
    del num_classes
    return mj.init_curricular_state()


def sv_softmax(
    inputs, state, *, step, axis_name, scale=16.0, t=1.2, margin_type="none", margin=0.0
):
    del step, axis_name
    loss = mj.sv_softmax_loss(
        _cos(inputs),
        inputs.labels,
        scale=scale,
        t=t,
        margin_type=margin_type,
        margin=margin,
    )
    return loss, state


def mv_softmax(
    inputs,
    state,
    *,
    step,
    axis_name,
    scale=16.0,
    t=0.2,
    margin_type="cosface",
    margin=0.35,
    mode="adaptive",
):
    del step, axis_name
    loss = mj.mv_softmax_loss(
        _cos(inputs),
        inputs.labels,
        scale=scale,
        t=t,
        margin_type=margin_type,
        margin=margin,
        mode=mode,
    )
    return loss, state


def eqm(inputs, state, *, step, axis_name, scale=16.0, t1=0.6, t2=0.25):
    del step, axis_name
    loss = mj.eqm_loss(_cos(inputs), inputs.labels, scale=scale, t1=t1, t2=t2)
    return loss, state


def focal(inputs, state, *, step, axis_name, scale=16.0, margin=0.0, gamma=2.0):
    """Focal loss on ArcFace margin logits (margin 0: on s·cos)."""
    del step, axis_name
    logits = mj.margin_logits(
        _cos(inputs),
        inputs.labels,
        target_fn=functools.partial(mj.arcface_target, margin=margin),
        scale=scale,
    )
    return mj.focal_loss(logits, inputs.labels, gamma=gamma), state


def hard_mining(
    inputs, state, *, step, axis_name, scale=16.0, margin=0.0, keep_ratio=0.9
):
    """HM-Softmax on ArcFace margin logits, the ranking over the device axis."""
    del step
    logits = mj.margin_logits(
        _cos(inputs),
        inputs.labels,
        target_fn=functools.partial(mj.arcface_target, margin=margin),
        scale=scale,
    )
    loss = mj.hard_mining_loss(
        logits, inputs.labels, keep_ratio=keep_ratio, axis_name=axis_name
    )
    return loss, state


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """A table entry: the loss and the initial value of its state."""

    fn: Callable[..., tuple[jax.Array, Any]]
    init_state: Callable[[int], Any] = _no_state


LOSSES: Mapping[str, LossSpec] = {
    "softmax": LossSpec(softmax),
    "normface": LossSpec(normface),
    "cosface": LossSpec(cosface),
    "arcface": LossSpec(arcface),
    "combined": LossSpec(combined),
    "sphereface": LossSpec(sphereface),
    "adacos": LossSpec(adacos, _adacos_state),
    "adacos_fixed": LossSpec(adacos_fixed),
    "curricularface": LossSpec(curricularface, _curricular_state),
    "sv_softmax": LossSpec(sv_softmax),
    "mv_softmax": LossSpec(mv_softmax),
    "eqm": LossSpec(eqm),
    "focal": LossSpec(focal),
    "hard_mining": LossSpec(hard_mining),
}

_CALL_ARGS = ("inputs", "state", "step", "axis_name")


def loss_hyperparameters(name: str) -> dict[str, Any]:
    """The hyperparameters of loss ``name`` with their defaults."""
    params = inspect.signature(get_loss(name).fn).parameters
    return {k: p.default for k, p in params.items() if k not in _CALL_ARGS}


def get_loss(name: str, hyperparameters: Mapping[str, Any] | None = None) -> LossSpec:
    """Looks ``name`` up in `LOSSES`; binds and checks ``hyperparameters``.

    Raises:
      ValueError: unknown name or hyperparameter; the message lists the valid
        choices.
    """
    if name not in LOSSES:
        raise ValueError(
            f"Unknown loss {name!r}; valid choices for config.loss.name: "
            f"{', '.join(sorted(LOSSES))}."
        )
    spec = LOSSES[name]
    if not hyperparameters:
        return spec
    valid = loss_hyperparameters(name)
    unknown = sorted(set(hyperparameters) - set(valid))
    if unknown:
        raise ValueError(
            f"Unknown hyperparameter(s) {unknown} for loss {name!r}; valid: "
            f"{', '.join(valid) or '(none)'}."
        )
    bound = dict(hyperparameters)

    def fn(inputs, state, *, step, axis_name):
        return spec.fn(inputs, state, step=step, axis_name=axis_name, **bound)

    return dataclasses.replace(spec, fn=fn)
