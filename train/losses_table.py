"""The loss table: config name -> margin_jax loss, with its state and defaults.

Every entry has the same signature,

    fn(inputs: LossInputs, state, *, step, axis_name, **hyperparameters)
        -> (per-example loss [B], or the scalar loss of a global batch, new state)

so the train step never branches on the loss. ``state`` is the loss's own
pytree carried in the train state, never seen by the optimiser (AdaCos scale,
CurricularFace t, center-loss centres, ...; an empty dict for stateless
losses), initialised by ``init_state(num_classes, embedding_dim)``; ``step``
drives schedules (SphereFace λ); ``axis_name`` is the pmap device axis, passed
to every margin_jax function that takes batch statistics. Hyperparameters come
from ``config.loss`` (see `config_loss`) and are checked against the
function's signature, so a typo fails before training with the list of valid
names.

The margin softmaxes are not rebuilt here: each is its factory of
`margin_jax.NAMED_STAGES`, with the library's defaults, run by the one
composer in whichever form the head asks for (`head_loss`). The table adds
only what a config needs: λ of SphereFace from the step (`SCHEDULES`), and
``scale: 0`` for the per-example feature norm (a config cannot hold None).
Plain softmax, center loss + softmax and the two-head triplet regulariser are
the entries outside the registry (dense head only).
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
    "SCHEDULES",
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


def softmax(inputs, state, *, step, axis_name):
    """Plain softmax CE on unnormalised logits x·Wᵀ (no bias)."""
    del step, axis_name
    logits = inputs.embeddings @ inputs.weights.T
    return mj.softmax_loss(logits, inputs.labels), state


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

    `margin_jax.two_head_loss` over the global batch: a scalar, the loss of
    the whole batch on every device (its gradient there is the device's share,
    `margin_jax.collective`), which the step takes as its objective.
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
    return loss, state


def _sphereface_lambda(step, *, base=1000.0, gamma=0.12, power=1.0, lambda_min=5.0):
    """SphereFace's λ annealed from the step (`margin_jax.sphereface_lambda`)."""
    lam = mj.sphereface_lambda(
        step, base=base, gamma=gamma, power=power, lambda_min=lambda_min
    )
    return {"lambda_": lam}


# Hyperparameters a loss of the registry takes from the step instead of the
# config: name -> (step, **schedule hyperparameters) -> factory keywords.
SCHEDULES: Mapping[str, Callable[..., dict]] = {"sphereface": _sphereface_lambda}


def _params(fn, drop=()) -> dict[str, Any]:
    return {
        k: p.default
        for k, p in inspect.signature(fn).parameters.items()
        if k not in drop and p.kind is p.KEYWORD_ONLY
    }


def _registered(name: str) -> LossSpec:
    """The entry of a loss of `margin_jax.NAMED_STAGES`: any head, its defaults."""
    factory = mj.NAMED_STAGES[name]
    schedule = SCHEDULES.get(name)
    produced = () if schedule is None else tuple(schedule(0))
    stateful = "state" in inspect.signature(factory).parameters
    hyper = _params(factory, drop=("state", *produced))
    if schedule is not None:
        hyper.update(_params(schedule))

    def stages(*, step, state=None, **bound):
        kwargs = {k: v for k, v in bound.items() if k in hyper}
        if schedule is not None:
            timed = {k: kwargs.pop(k) for k in _params(schedule) if k in kwargs}
            kwargs.update(schedule(step, **timed))
        if kwargs.get("scale", None) == 0:  # a config's None: the feature norm
            kwargs["scale"] = None
        return factory(**kwargs, state=state) if stateful else factory(**kwargs)

    def init_state(num_classes, dim):
        del num_classes, dim
        return factory().state if stateful else {}

    choices = {"margin_type": mj.stages.MARGIN_TYPES, "mode": mj.non_targets.MV_MODES}
    spec = LossSpec(
        fn=None, init_state=init_state, stages=stages, hyperparameters=hyper
    )
    return dataclasses.replace(
        spec,
        fn=_stage_head(spec, "dense"),
        choices={k: v for k, v in choices.items() if k in hyper},
    )


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """A table entry: the loss and the initial value of its state.

    ``stages`` is set for the losses of `margin_jax.NAMED_STAGES`, (step,
    state, **hyperparameters) -> `margin_jax.Stages`: those run with every
    head (dense, chunked, sharded) through the one composer. ``two_head``: the
    loss reads ``LossInputs.logits`` (a two-head model,
    `train.models.TWO_HEAD_MODELS`, dense head). ``sampler``: the batch
    sampler the loss needs (None: any). ``choices``: the valid values of the
    string hyperparameters, checked by `get_loss`. ``hyperparameters``: the
    valid names with their defaults (None: the signature of ``fn``).
    """

    fn: Callable[..., tuple[jax.Array, Any]] | None
    init_state: Callable[[int, int], Any] = _no_state
    stages: Callable[..., mj.Stages] | None = None
    two_head: bool = False
    sampler: str | None = None
    choices: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    hyperparameters: Mapping[str, Any] | None = None


_CALL_ARGS = ("inputs", "state", "step", "axis_name")


def loss_hyperparameters(name: str) -> dict[str, Any]:
    """The hyperparameters of loss ``name`` with their defaults."""
    spec = get_loss(name)
    if spec.hyperparameters is not None:
        return dict(spec.hyperparameters)
    params = inspect.signature(spec.fn).parameters
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
    if spec.stages is not None:
        spec = dataclasses.replace(spec, stages=functools.partial(spec.stages, **bound))
        return dataclasses.replace(spec, fn=_stage_head(spec, "dense"))

    def fn(inputs, state, *, step, axis_name):
        return spec.fn(inputs, state, step=step, axis_name=axis_name, **bound)

    return dataclasses.replace(spec, fn=fn)


HEADS = ("dense", "chunked", "sharded")


def _stage_head(
    spec: LossSpec,
    head: str,
    *,
    chunk_size: int | None = None,
    partial_fc_rate: float = 1.0,
    num_classes: int | None = None,
):
    """A registered loss with head ``head``: the same stages in every form."""

    def fn(inputs, state, *, step, axis_name, rng=None):
        stages = spec.stages(step=step, state=state)
        x, weights, labels = inputs.embeddings, inputs.weights, inputs.labels
        if head == "dense":
            out = mj.margin_softmax_loss(
                mj.cosine_logits(x, weights),
                labels,
                stages=stages,
                feature_norm=jnp.linalg.norm(x, axis=-1),
                axis_name=axis_name,
            )
        elif head == "chunked":
            out = mj.chunked_margin_loss(
                x,
                weights,
                labels,
                stages=stages,
                chunk_size=chunk_size,
                axis_name=axis_name,
            )
        else:
            extra = {"num_classes": num_classes}
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
            out = mj.sharded_margin_loss(
                x,
                weights,
                labels,
                axis_name=axis_name,
                stages=stages,
                chunk_size=chunk_size,
                **extra,
            )
        return out if stages.state is not None else (out, state)

    return fn


def head_loss(
    spec: LossSpec,
    head: str,
    *,
    chunk_size: int | None = None,
    partial_fc_rate: float = 1.0,
    num_classes: int | None = None,
):
    """The loss with the classifier head ``head``: dense, chunked or sharded.

    * dense: the loss on the cosine logits [B, C];
    * chunked: `margin_jax.chunked_margin_loss`, exact, never builds [B, C];
    * sharded: `margin_jax.sharded_margin_loss`, ``inputs.weights`` is this
      device's shard of W (classes split over the device axis), optionally with
      Partial FC sampling at ``partial_fc_rate`` (``rng`` needed).

    Every loss of `margin_jax.NAMED_STAGES` runs with every head;
    ``chunk_size`` None (or 0) takes `margin_jax.default_chunk_size`.

    Raises:
      ValueError: unknown head, or a head other than dense for a loss outside
        the registry (lists the valid ones).
    """
    if head not in HEADS:
        raise ValueError(
            f"Unknown head {head!r}; valid choices for config.head: {', '.join(HEADS)}."
        )
    if chunk_size is not None and (not mj._checks.is_int(chunk_size) or chunk_size < 0):
        raise ValueError(
            "config.head_chunk_size must be an int >= 0 (0: from the memory budget, "
            f"margin_jax.default_chunk_size); got {chunk_size!r}."
        )
    if spec.stages is not None:
        return _stage_head(
            spec,
            head,
            chunk_size=chunk_size or None,
            partial_fc_rate=partial_fc_rate,
            num_classes=num_classes,
        )
    if head != "dense":
        valid = sorted(k for k, v in LOSSES.items() if v.stages is not None)
        raise ValueError(
            f"The {head} head needs a loss of margin_jax.NAMED_STAGES; valid "
            f"config.loss.name choices with config.head={head!r}: {', '.join(valid)}."
        )

    def dense(inputs, state, *, step, axis_name, rng=None):
        del rng
        return spec.fn(inputs, state, step=step, axis_name=axis_name)

    return dense


LOSSES: Mapping[str, LossSpec] = {
    "softmax": LossSpec(softmax),
    **{name: _registered(name) for name in mj.NAMED_STAGES},
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
