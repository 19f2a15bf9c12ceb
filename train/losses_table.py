"""The loss table: config name -> margin_jax loss, with its state and defaults.

Every entry has the same signature,

    fn(inputs: LossInputs, state, *, step, axis_name, **hyperparameters)
        -> (per-example loss [B], new state)

so the train step never branches on the loss. ``state`` is the loss's own
pytree carried in the train state, never seen by the optimiser (AdaCos scale,
CurricularFace t, center-loss centres, ...; an empty dict for stateless
losses), initialised by ``init_state(num_classes, embedding_dim)``; ``step``
drives schedules (SphereFace λ); ``axis_name`` is the pmap device axis, passed
to every margin_jax function that takes batch statistics. Hyperparameters come
from ``config.loss`` (see `config_loss`) and are checked against the
function's signature, so a typo fails before training with the list of valid
names.

The step takes the mean of the per-example loss on each device and averages
the gradients over the devices, right for per-example losses on equal shards.
A batch statistic over the device axis (the mined triplet loss) is instead
one value whose per-device gradients must be summed: `_device_sum_gradient`
makes it fit the same step.
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

__all__ = [
    "HEADS",
    "LOSSES",
    "LossInputs",
    "LossSpec",
    "Stages",
    "config_loss",
    "get_loss",
    "head_loss",
    "loss_hyperparameters",
]


class LossInputs(NamedTuple):
    """What the model gives a loss: embeddings [B, D], class weights W [C, D].

    ``logits`` [B, C] is the classifier head of a two-head model
    (`train.models.TwoHeadModel`; None otherwise); its ``weights`` are then the
    classifier's [C, F] and the embeddings are the ranking head's.
    """

    embeddings: jax.Array
    weights: jax.Array
    labels: jax.Array
    logits: jax.Array | None = None


def _cos(inputs: LossInputs) -> jax.Array:
    return mj.cosine_logits(inputs.embeddings, inputs.weights)


def _no_state(num_classes: int, dim: int) -> dict:
    del num_classes, dim
    return {}


def _device_sum_gradient(value: jax.Array, axis_name) -> jax.Array:
    """``value`` unchanged, its gradient times the number of devices.

    A margin_jax batch statistic over ``axis_name`` (triplet, two-head) is the
    global value on every device, and each device's gradient is already the
    global loss's gradient for its own rows (``all_gather``'s transpose adds
    the other devices' terms): the parameters' gradient is the *sum* over
    devices. The step averages (pmean) instead, so scale by the device count.
    """
    if axis_name is None:
        return value
    n = jax.lax.psum(1, axis_name)
    return n * value - jax.lax.stop_gradient((n - 1) * value)


def softmax(inputs, state, *, step, axis_name):
    """Plain softmax CE on unnormalised logits x·Wᵀ (no bias)."""
    del step, axis_name
    logits = inputs.embeddings @ inputs.weights.T
    return mj.softmax_loss(logits, inputs.labels), state


class Stages(NamedTuple):
    """A margin softmax as its stages (see `margin_jax.margin_softmax_loss`)."""

    target_fn: Callable
    non_target_fn: Callable | None
    scale: Any  # scalar or per-example [B]


def normface(embeddings, *, step, scale=16.0):
    del embeddings, step
    return Stages(mj.normface_target, None, scale)


def cosface(embeddings, *, step, scale=16.0, margin=0.35):
    del embeddings, step
    return Stages(functools.partial(mj.cosface_target, margin=margin), None, scale)


def arcface(
    embeddings,
    *,
    step,
    scale=16.0,
    margin=0.5,
    easy_margin=False,
    straight_through=False,
):
    del embeddings, step
    target = functools.partial(
        mj.arcface_target, margin=margin, easy_margin=easy_margin
    )
    return Stages(
        mj.straight_through(target) if straight_through else target, None, scale
    )


def combined(embeddings, *, step, scale=16.0, m1=1.0, m2=0.3, m3=0.2):
    del embeddings, step
    return Stages(
        functools.partial(mj.combined_target, m1=m1, m2=m2, m3=m3), None, scale
    )


def sphereface(
    embeddings,
    *,
    step,
    margin=4,
    base=1000.0,
    gamma=0.12,
    power=1.0,
    lambda_min=5.0,
    scale=0.0,
):
    """SphereFace with λ annealed from the step; ``scale`` 0 = original form
    (the per-example scale is the feature norm ||x||)."""
    lambda_ = mj.sphereface_lambda(
        step, base=base, gamma=gamma, power=power, lambda_min=lambda_min
    )
    target = functools.partial(mj.sphereface_target, margin=margin, lambda_=lambda_)
    return Stages(target, None, scale or jnp.linalg.norm(embeddings, axis=-1))


def sv_softmax(embeddings, *, step, scale=16.0, t=1.2, margin_type="none", margin=0.0):
    del embeddings, step
    target = mj.losses.margin_target_fn(margin_type, margin, fn="sv_softmax")
    return Stages(target, functools.partial(mj.sv_non_target, t=t), scale)


def mv_softmax(
    embeddings,
    *,
    step,
    scale=16.0,
    t=0.2,
    margin_type="cosface",
    margin=0.35,
    mode="adaptive",
):
    del embeddings, step
    target = mj.losses.margin_target_fn(margin_type, margin, fn="mv_softmax")
    return Stages(target, functools.partial(mj.mv_non_target, t=t, mode=mode), scale)


def eqm(embeddings, *, step, scale=16.0, t1=0.6, t2=0.25):
    del embeddings, step
    return Stages(
        functools.partial(mj.eqm_target, t1=t1),
        functools.partial(mj.eqm_non_target, t2=t2),
        scale,
    )


def _dense_from_stages(stages_fn):
    """The dense loss of a stage-defined margin softmax (the composer on cos)."""

    def fn(inputs, state, *, step, axis_name, **hyperparameters):
        del axis_name
        stages = stages_fn(inputs.embeddings, step=step, **hyperparameters)
        loss = mj.margin_softmax_loss(
            _cos(inputs),
            inputs.labels,
            target_fn=stages.target_fn,
            non_target_fn=stages.non_target_fn,
            scale=stages.scale,
        )
        return loss, state

    return fn


def adacos(inputs, state, *, step, axis_name):
    """Dynamic AdaCos: the scale is state, updated over the whole device axis."""
    del step
    cos = _cos(inputs)
    scale = mj.adacos_dynamic_scale(
        cos, inputs.labels, state["scale"], axis_name=axis_name
    )
    return mj.adacos_loss(cos, inputs.labels, scale=scale), {"scale": scale}


def _adacos_state(num_classes: int, dim: int) -> dict:
    del dim
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


def _curricular_state(num_classes: int, dim: int):
    del num_classes, dim
    return mj.init_curricular_state()


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


def _classifier_loss(inputs, classifier, scale):
    if classifier == "softmax":
        logits = inputs.embeddings @ inputs.weights.T
        return mj.softmax_loss(logits, inputs.labels)
    if classifier == "normface":
        return mj.normface_loss(_cos(inputs), inputs.labels, scale=scale)
    raise ValueError(f"Unknown classifier {classifier!r}: softmax or normface.")


def center_softmax(
    inputs,
    state,
    *,
    step,
    axis_name,
    lambda_=0.003,
    alpha=0.5,
    classifier="softmax",
    scale=16.0,
):
    """Softmax (or NormFace) CE + λ·center loss (Wen et al. 2016).

    The centres are the loss state: the loss uses this step's centres, then
    they move by the rule of the paper over the global batch (``axis_name``),
    without gradient and outside the optimiser.
    """
    del step
    loss = _classifier_loss(inputs, classifier, scale) + lambda_ * mj.center_loss(
        inputs.embeddings, inputs.labels, state
    )
    new_state = mj.update_centers(
        state, inputs.embeddings, inputs.labels, alpha=alpha, axis_name=axis_name
    )
    return loss, new_state


def _center_state(num_classes: int, dim: int) -> mj.CenterState:
    return mj.init_centers(num_classes, dim)


def softmax_triplet(
    inputs,
    state,
    *,
    step,
    axis_name,
    lambda_=1.0,
    margin=0.2,
    mining="semi_hard",
    metric="squared_l2",
):
    """Two-head regulariser (Taha et al. 2020): CE(logits) + λ·triplet(x̂).

    `margin_jax.two_head_loss` over the global batch; a scalar, given to the
    step as a constant [B] (its mean) with the device-sum gradient.
    """
    del step
    loss = mj.two_head_loss(
        inputs.logits,
        inputs.embeddings,
        inputs.labels,
        lambda_=lambda_,
        margin=margin,
        mining=mining,
        metric=metric,
        axis_name=axis_name,
    )
    loss = _device_sum_gradient(loss, axis_name)
    return jnp.broadcast_to(loss, inputs.labels.shape), state


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """A table entry: the loss and the initial value of its state.

    ``stages`` is set for the margin softmaxes that are one target and one
    non-target stage: those also run with the chunked and sharded heads.
    ``two_head``: the loss reads ``LossInputs.logits`` (a two-head model,
    `train.models.TWO_HEAD_MODELS`, dense head). ``sampler``: the batch
    sampler the loss needs (None: any). ``choices``: the valid values of the
    string hyperparameters, checked by `get_loss`.
    """

    fn: Callable[..., tuple[jax.Array, Any]]
    init_state: Callable[[int, int], Any] = _no_state
    stages: Callable[..., Stages] | None = None
    two_head: bool = False
    sampler: str | None = None
    choices: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


def _margin(stages_fn) -> LossSpec:
    return LossSpec(_dense_from_stages(stages_fn), stages=stages_fn)


LOSSES: Mapping[str, LossSpec] = {
    "softmax": LossSpec(softmax),
    "normface": _margin(normface),
    "cosface": _margin(cosface),
    "arcface": _margin(arcface),
    "combined": _margin(combined),
    "sphereface": _margin(sphereface),
    "adacos": LossSpec(adacos, _adacos_state),
    "adacos_fixed": LossSpec(adacos_fixed),
    "curricularface": LossSpec(curricularface, _curricular_state),
    "sv_softmax": _margin(sv_softmax),
    "mv_softmax": _margin(mv_softmax),
    "eqm": _margin(eqm),
    "focal": LossSpec(focal),
    "hard_mining": LossSpec(hard_mining),
    "center_softmax": LossSpec(
        center_softmax,
        _center_state,
        choices={"classifier": ("softmax", "normface")},
    ),
    "softmax_triplet": LossSpec(
        softmax_triplet,
        two_head=True,
        sampler="pk",
        choices={"mining": mj.pairs.MININGS, "metric": mj.pairs.METRICS},
    ),
}

_CALL_ARGS = ("inputs", "state", "step", "axis_name", "embeddings")


def loss_hyperparameters(name: str) -> dict[str, Any]:
    """The hyperparameters of loss ``name`` with their defaults."""
    spec = get_loss(name)
    params = inspect.signature(spec.stages or spec.fn).parameters
    return {k: p.default for k, p in params.items() if k not in _CALL_ARGS}


def config_loss(loss_config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(name, hyperparameters) of a ``config.loss``.

    ``config.loss`` holds ``name`` and the hyperparameters, either flat
    (``{"name": "cosface", "margin": 0.35}``) or, for any number of losses,
    under each loss's name (``{"name": "cosface", "cosface": {"margin":
    0.35}, "arcface": {...}}``): the entry of ``name`` is used and the others
    are ignored, so ``--config.loss.name=softmax`` on a config tuned for
    ArcFace takes softmax's own settings. Flat keys win over the entry.
    """
    items = dict(loss_config)
    if "name" not in items:
        raise ValueError(
            f"config.loss needs a 'name' (one of {', '.join(sorted(LOSSES))}); "
            f"got keys {sorted(items)}."
        )
    name = items.pop("name")
    tuned = items.pop(name, None) or {}
    flat = {k: v for k, v in items.items() if k not in LOSSES}
    return name, {**dict(tuned), **flat}


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
    for key, options in spec.choices.items():
        if key in hyperparameters and hyperparameters[key] not in options:
            raise ValueError(
                f"Unknown {key} {hyperparameters[key]!r} for loss {name!r}; valid "
                f"choices for config.loss.{key}: {', '.join(options)}."
            )
    bound = dict(hyperparameters)

    def fn(inputs, state, *, step, axis_name):
        return spec.fn(inputs, state, step=step, axis_name=axis_name, **bound)

    stages = None
    if spec.stages is not None:
        stages = functools.partial(spec.stages, **bound)
    return dataclasses.replace(spec, fn=fn, stages=stages)


HEADS = ("dense", "chunked", "sharded")


def head_loss(
    spec: LossSpec,
    head: str,
    *,
    chunk_size: int = 2048,
    partial_fc_rate: float = 1.0,
    num_classes: int | None = None,
):
    """The loss with the classifier head ``head``: dense, chunked or sharded.

    * dense: ``spec.fn`` on the cosine logits [B, C];
    * chunked: `margin_jax.chunked_margin_loss`, exact, never builds [B, C];
    * sharded: `margin_jax.sharded_margin_loss`, ``inputs.weights`` is this
      device's shard of W (classes split over the device axis), optionally with
      Partial FC sampling at ``partial_fc_rate`` (``inputs.rng`` needed).

    Raises:
      ValueError: unknown head, or a loss without a stage form (lists them).
    """
    if head not in HEADS:
        raise ValueError(
            f"Unknown head {head!r}; valid choices for config.head: {', '.join(HEADS)}."
        )
    if head == "dense":

        def dense(inputs, state, *, step, axis_name, rng=None):
            del rng
            return spec.fn(inputs, state, step=step, axis_name=axis_name)

        return dense
    if spec.stages is None:
        valid = sorted(k for k, v in LOSSES.items() if v.stages is not None)
        raise ValueError(
            f"The {head} head needs a margin softmax given by stages; valid "
            f"config.loss.name choices with config.head={head!r}: {', '.join(valid)}."
        )

    def fn(inputs, state, *, step, axis_name, rng=None):
        stages = spec.stages(inputs.embeddings, step=step)
        kwargs = dict(
            target_fn=stages.target_fn,
            non_target_fn=stages.non_target_fn,
            scale=stages.scale,
        )
        if head == "chunked":
            loss = mj.chunked_margin_loss(
                inputs.embeddings,
                inputs.weights,
                inputs.labels,
                chunk_size=chunk_size,
                **kwargs,
            )
            return loss, state
        weights, labels, extra = inputs.weights, inputs.labels, {}
        if partial_fc_rate < 1.0:
            sample = mj.partial_fc_sample(
                labels,
                weights.shape[0],
                rate=partial_fc_rate,
                key=rng,
                axis_name=axis_name,
                total_classes=num_classes,
            )
            weights, labels = weights[sample.index], sample.labels
            extra = {"num_valid": sample.num_valid}
        else:
            extra = {"num_classes": num_classes}
        loss = mj.sharded_margin_loss(
            inputs.embeddings,
            weights,
            labels,
            axis_name=axis_name,
            chunk_size=min(chunk_size, weights.shape[0]),
            **extra,
            **kwargs,
        )
        return loss, state

    return fn
