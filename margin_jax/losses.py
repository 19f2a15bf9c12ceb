"""The margin-softmax composer and the named losses built from it.

Every margin softmax is one pipeline:

    cos [B, C] -> target transform f(c_y) -> non-target transform g(c, f)
    -> scaled cross-entropy of s·z, with z_y = f(c_y) and z_k = g(c_k, f)

`margin_softmax_loss` runs it for any pair of stage functions (`margin_jax.targets`,
`margin_jax.non_targets`); each named loss below is that composer with fixed stages.
All losses return the per-example loss [B] (the caller reduces, as in optax),
take ``where`` (bool [B]) for padding, and compute in float32 or wider.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from margin_jax import _checks
from margin_jax.adaptive import CurricularState
from margin_jax.composer import compose, dense_form, resolve_stages
from margin_jax.cosine import put_target, take_target
from margin_jax.cross_entropy import cross_entropy_from_gaps
from margin_jax.example_weights import focal_weight_from_ce, hard_mining_mask
from margin_jax.stages import (
    MARGIN_TYPES,
    Stages,
    arcface_stages,
    combined_stages,
    cosface_stages,
    curricularface_stages,
    eqm_stages,
    margin_target_fn,
    mv_softmax_stages,
    normface_stages,
    sphereface_stages,
    sv_softmax_stages,
)

__all__ = [
    "margin_logits",
    "margin_softmax_loss",
    "softmax_loss",
    "normface_loss",
    "cosface_loss",
    "arcface_loss",
    "combined_margin_loss",
    "sphereface_loss",
    "adacos_loss",
    "focal_loss",
    "hard_mining_loss",
    "sv_softmax_loss",
    "mv_softmax_loss",
    "eqm_loss",
    "curricularface_loss",
    "margin_target_fn",
    "cross_entropy_from_gaps",
]

TargetFn = Callable[[jax.Array], jax.Array]
NonTargetFn = Callable[[jax.Array, jax.Array], jax.Array]
_ = (MARGIN_TYPES, margin_target_fn)  # re-exported: margin_jax.losses.margin_target_fn


def margin_logits(
    cos: ArrayLike,
    labels: ArrayLike,
    *,
    target_fn: TargetFn | None = None,
    non_target_fn: NonTargetFn | None = None,
    scale: ArrayLike | None = None,
    stages: Stages | None = None,
) -> jax.Array:
    """The scaled margin logits s·z [B, C] of the pipeline (no loss taken).

    Use them to compose the margin with any loss of logits, e.g. the naive
    mining-margin softmax ``focal_loss(margin_logits(cos, labels, ...), labels)``
    or ``hard_mining_loss(margin_logits(...), labels)``.

    Args:
      cos: [B, C] cosines (`margin_jax.cosine_logits`).
      labels: [B] integer labels.
      target_fn: c_y [B] -> f(c_y) [B] (a `margin_jax.targets` function).
      non_target_fn: optional (cos [B, C], f [B, 1]) -> [B, C], elementwise
        (a `margin_jax.non_targets` stage); its target column is overwritten.
      scale: s, a scalar or per-example [B].
      stages: instead of the three keywords, a `Stages` without batch
        statistics or example weight (e.g. ``arcface_stages(margin=0.5)``).

    Returns:
      [B, C] logits.

    Example:
      >>> import functools, jax.numpy as jnp
      >>> import margin_jax as mj
      >>> cos = jnp.array([[0.8, 0.1], [0.3, 0.6]])
      >>> f = functools.partial(mj.cosface_target, margin=0.35)
      >>> logits = mj.margin_logits(cos, jnp.array([0, 1]), target_fn=f, scale=10.0)
      >>> [[round(float(v), 4) for v in row] for row in logits]
      [[4.5, 1.0], [3.0, 2.5]]
    """
    fn = "margin_logits"
    cos, labels, _ = _checks.prepare_cos_labels(fn, cos, labels)
    stages = resolve_stages(stages, target_fn, non_target_fn, scale, fn)
    if stages.statistics is not None or stages.example_fn is not None:
        raise ValueError(
            f"{fn}: the logits of stages with batch statistics or an example "
            "weight are not defined; use margin_softmax_loss."
        )
    target = stages.target_fn(take_target(cos, labels))
    g = stages.non_target_fn
    z = cos if g is None else g(cos, target[:, None])
    s = _checks.scale_vector(stages.scale, cos.shape[0], cos.dtype, fn)
    return s[:, None] * put_target(z, labels, target)


def margin_softmax_loss(
    cos: ArrayLike,
    labels: ArrayLike,
    *,
    stages: Stages | None = None,
    target_fn: TargetFn | None = None,
    non_target_fn: NonTargetFn | None = None,
    scale: ArrayLike | None = None,
    where: ArrayLike | None = None,
    feature_norm: ArrayLike | None = None,
    axis_name=None,
):
    """The composer, dense form: CE(s·z, y) with z_y = f(c_y) and z_k = g(c_k, f(c_y)).

    ℓ_i = logsumexp_j(s·z_ij) - s·f(c_{i,y_i}) = log(1 + Σ_{j≠y} exp(s·(z_ij -
    f))). The target logit is taken once from the [B] vector f(c_y), never
    re-gathered from the [B, C] matrix nor subtracted from a full log-sum-exp
    (see `cross_entropy_from_gaps`), and the pipeline is elementwise on [B, C]
    plus one max and one sum, so XLA fuses it into about the cost of plain
    softmax cross-entropy.

    Args:
      cos: [B, C] cosines in [-1, 1] (any float dtype; computed in >= float32).
      labels: [B] integer class indices in [0, C) (checked when concrete;
        undefined under jit if out of range).
      stages: a `Stages` (e.g. ``NAMED_STAGES["arcface"](margin=0.5)``), or
        instead the three stage keywords:
      target_fn: target stage, c_y [B] -> f(c_y) [B].
      non_target_fn: optional non-target stage (cos [B, C], f [B, 1]) -> [B, C],
        elementwise; the target column of its output is ignored.
      scale: s, scalar or [B] (no gradient is stopped: wrap it in
        `jax.lax.stop_gradient` if it must not be learned).
      where: optional bool [B]; False rows give exactly 0 and no gradient.
      feature_norm: [B] ||x_i||, for stages with ``scale=None``.
      axis_name: the device axis the batch statistics of ``stages`` cover.

    Returns:
      [B] per-example loss in the compute dtype; ``(loss, new_state)`` when
      ``stages.state`` is set (CurricularFace, dynamic AdaCos).

    Example:
      >>> import functools, jax.numpy as jnp
      >>> import margin_jax as mj
      >>> cos = jnp.array([[0.8, 0.1], [0.3, 0.6]])
      >>> f = functools.partial(mj.arcface_target, margin=0.5)
      >>> mj.margin_softmax_loss(cos, jnp.array([0, 1]), target_fn=f, scale=16.0).shape
      (2,)
    """
    fn = "margin_softmax_loss"
    cos, labels, where = _checks.prepare_cos_labels(fn, cos, labels, where)
    stages = resolve_stages(stages, target_fn, non_target_fn, scale, fn)
    if feature_norm is not None:
        _checks.check_rank(feature_norm, 1, "feature_norm", fn, "[B]")
    form = dense_form(cos, labels, feature_norm)
    return compose(
        stages, form, where=where, axis_name=axis_name, fn=fn, dtype=cos.dtype
    )


def softmax_loss(
    logits: ArrayLike, labels: ArrayLike, *, where: ArrayLike | None = None
) -> jax.Array:
    """Softmax cross-entropy with integer labels: logsumexp_j z_j - z_y.

    Args:
      logits: [B, C].
      labels: [B] integers in [0, C).
      where: optional bool [B]; False rows give 0 and no gradient.

    Returns:
      [B] losses (float32 or wider).

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import softmax_loss
      >>> round(float(softmax_loss(jnp.zeros((1, 4)), jnp.array([2]))[0]), 6)  # ln 4
      1.386294
    """
    logits, labels, where = _checks.prepare_cos_labels(
        "softmax_loss", logits, labels, where, name="logits"
    )
    loss = cross_entropy_from_gaps(
        logits - take_target(logits, labels)[:, None], labels
    )
    return loss if where is None else jnp.where(where, loss, 0.0)


def normface_loss(
    cos: ArrayLike, labels: ArrayLike, *, scale: ArrayLike = 64.0, where=None
) -> jax.Array:
    """NormFace (normalised softmax): CE(s·c, y), no margin.

    Default s = 64 as the margin losses; the NormFace paper learns s (from 10)
    and pytorch-metric-learning's NormalizedSoftmaxLoss uses temperature 0.05
    (s = 20).

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import normface_loss
      >>> loss = normface_loss(jnp.array([[1.0, 0.0]]), jnp.array([0]), scale=1.0)
      >>> round(float(loss[0]), 4)  # log(1 + e^-1)
      0.3133

    References:
      Wang et al., "NormFace", ACM MM 2017, https://arxiv.org/abs/1704.06369
    """
    return margin_softmax_loss(
        cos, labels, stages=normface_stages(scale=scale), where=where
    )


def cosface_loss(
    cos: ArrayLike,
    labels: ArrayLike,
    *,
    scale: ArrayLike = 64.0,
    margin: ArrayLike = 0.35,
    where=None,
) -> jax.Array:
    """CosFace / AM-Softmax: CE with target logit s·(c_y - m).

    Defaults s = 64, m = 0.35 (CosFace; the AM-Softmax paper uses s = 30).

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import cosface_loss
      >>> cosface_loss(jnp.array([[0.9, 0.1]]), jnp.array([0])).shape
      (1,)

    References:
      Wang et al., CosFace, CVPR 2018, https://arxiv.org/abs/1801.09414
    """
    stages = cosface_stages(margin=margin, scale=scale)
    return margin_softmax_loss(cos, labels, stages=stages, where=where)


def arcface_loss(
    cos: ArrayLike,
    labels: ArrayLike,
    *,
    scale: ArrayLike = 64.0,
    margin: ArrayLike = 0.5,
    easy_margin: bool = False,
    straight_through: bool = False,
    where=None,
) -> jax.Array:
    """ArcFace: CE with target logit s·cos(θ_y + m) (see `arcface_target`).

    Defaults s = 64, m = 0.5 rad. The default gradient is exact; with
    ``straight_through=True`` the value is the same but the target receives the
    plain cosine's gradient, which is what current insightface computes.

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import arcface_loss
      >>> arcface_loss(jnp.array([[0.9, 0.1]]), jnp.array([0])).shape
      (1,)

    References:
      Deng et al., ArcFace, CVPR 2019, https://arxiv.org/abs/1801.07698
    """
    stages = arcface_stages(
        margin=margin,
        scale=scale,
        easy_margin=easy_margin,
        straight_through=straight_through,
    )
    return margin_softmax_loss(cos, labels, stages=stages, where=where)


def combined_margin_loss(
    cos: ArrayLike,
    labels: ArrayLike,
    *,
    scale: ArrayLike = 64.0,
    m1: ArrayLike = 1.0,
    m2: ArrayLike = 0.3,
    m3: ArrayLike = 0.2,
    where=None,
) -> jax.Array:
    """Combined margin: target logit s·(cos(m1·θ_y + m2) - m3), all terms honoured.

    See `combined_target`. Defaults (1.0, 0.3, 0.2) are insightface's combined
    setting. Unlike insightface's PyTorch CombinedMarginLoss, m1 and m2 are not
    dropped when m3 > 0.

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import combined_margin_loss
      >>> combined_margin_loss(jnp.array([[0.9, 0.1]]), jnp.array([0])).shape
      (1,)
    """
    stages = combined_stages(m1=m1, m2=m2, m3=m3, scale=scale)
    return margin_softmax_loss(cos, labels, stages=stages, where=where)


def sphereface_loss(
    cos: ArrayLike,
    labels: ArrayLike,
    *,
    margin: int = 4,
    lambda_: ArrayLike = 0.0,
    feature_norm: ArrayLike | None = None,
    scale: ArrayLike | None = None,
    where=None,
) -> jax.Array:
    """SphereFace / A-Softmax with the λ blend of the original training.

    Target logit (λ·c_y + ψ(θ_y)) / (1 + λ) with ψ from `sphereface_psi`; other
    logits c_j. Two forms:

    * original (``feature_norm`` = ||x_i||, [B]): logits are ||x_i||·z_ij, i.e.
      the features are not normalised (pass the norms with their gradient, e.g.
      ``jnp.linalg.norm(x, axis=-1)``, for the paper's training);
    * normalised (``scale`` = s): logits s·z_ij, as the CosFace/ArcFace family;
      s defaults to 64 when neither is given.

    Args:
      cos: [B, C] cosines.
      labels: [B].
      margin: m, a static Python int >= 1 (default 4).
      lambda_: λ >= 0; schedule it with `sphereface_lambda` (SphereFace anneals
        from 1000 to 5). Default 0 (pure ψ).
      feature_norm: optional [B] feature norms (original form).
      scale: optional scalar s (normalised form).
      where: optional bool [B].

    Raises:
      TypeError: ``margin`` is not a Python int.
      ValueError: both ``feature_norm`` and ``scale`` are given.

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import sphereface_loss
      >>> cos = jnp.array([[0.9, 0.1]])
      >>> sphereface_loss(cos, jnp.array([0]), feature_norm=jnp.array([3.0])).shape
      (1,)

    References:
      Liu et al., SphereFace, CVPR 2017, https://arxiv.org/abs/1704.08063
    """
    if feature_norm is not None and scale is not None:
        raise ValueError(
            "sphereface_loss: give either `feature_norm` (original form, [B]) or "
            "`scale` (normalised form, scalar), not both."
        )
    if feature_norm is None and scale is None:
        scale = 64.0
    stages = sphereface_stages(margin=margin, lambda_=lambda_, scale=scale)
    return margin_softmax_loss(
        cos, labels, stages=stages, where=where, feature_norm=feature_norm
    )


def adacos_loss(
    cos: ArrayLike, labels: ArrayLike, *, scale: ArrayLike, where=None
) -> jax.Array:
    """AdaCos: NormFace with an adaptive scale and no gradient through it.

    Pass ``scale = adacos_fixed_scale(C)`` (fixed AdaCos) or this step's
    ``adacos_dynamic_scale(cos, labels, prev_scale)`` (dynamic AdaCos).

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_jax as mj
      >>> cos = jnp.array([[0.9, 0.1, 0.0]])
      >>> mj.adacos_loss(cos, jnp.array([0]), scale=mj.adacos_fixed_scale(3)).shape
      (1,)

    References:
      Zhang et al., AdaCos, CVPR 2019, https://arxiv.org/abs/1905.00292
    """
    stages = normface_stages(scale=jax.lax.stop_gradient(scale))
    return margin_softmax_loss(cos, labels, stages=stages, where=where)


def focal_loss(
    logits: ArrayLike, labels: ArrayLike, *, gamma: ArrayLike = 2.0, where=None
) -> jax.Array:
    """Focal loss, softmax form: ℓ = -(1 - p_y)^γ·log p_y.

    The composition `focal_weight` × `softmax_loss` (the weight is taken from
    the CE itself, p_y = exp(-CE), so it costs no second pass over [B, C]);
    ``logits`` may be margin logits (`margin_logits`), which gives the naive
    mining-margin softmax.

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import focal_loss
      >>> round(float(focal_loss(jnp.zeros((1, 2)), jnp.array([0]), gamma=0.0)[0]), 6)
      0.693147

    References:
      Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017,
      https://arxiv.org/abs/1708.02002
    """
    ce = softmax_loss(logits, labels, where=where)
    # p_y = exp(-ce): the weight needs no second pass over the logits.
    return focal_weight_from_ce(ce, gamma=gamma) * ce


def hard_mining_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    keep_ratio: ArrayLike = 0.9,
    where=None,
    axis_name: str | None = None,
) -> jax.Array:
    """HM-Softmax: CE on the ⌊r·B⌋ hardest examples, 0 on the others.

    The composition `hard_mining_mask` × `softmax_loss`. With ``axis_name`` the
    selection ranks the whole global batch (equal to the single-device result on
    the concatenated batch). ``logits`` may be margin logits (`margin_logits`).

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import hard_mining_loss
      >>> logits = jnp.array([[2.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
      >>> loss = hard_mining_loss(logits, jnp.array([0, 0, 0]), keep_ratio=0.34)
      >>> [round(float(v), 3) for v in loss]
      [0.0, 2.127, 0.0]

    References:
      Shrivastava et al., "Training Region-based Object Detectors with Online Hard
      Example Mining", CVPR 2016, https://arxiv.org/abs/1604.03540
    """
    ce = softmax_loss(logits, labels, where=where)
    keep = hard_mining_mask(ce, keep_ratio=keep_ratio, where=where, axis_name=axis_name)
    return jnp.where(keep, ce, 0.0)


def sv_softmax_loss(
    cos: ArrayLike,
    labels: ArrayLike,
    *,
    scale: ArrayLike = 32.0,
    t: ArrayLike = 1.2,
    margin_type: str = "none",
    margin: ArrayLike = 0.0,
    where=None,
) -> jax.Array:
    """SV-Softmax and SV-X-Softmax (SV-AM, SV-Arc).

    Support vectors k != y with c_k > f(c_y) get logit t·c_k + t - 1
    (`sv_non_target`); f is the identity ('none', SV-Softmax), CosFace
    ('cosface', SV-AM) or ArcFace ('arcface', SV-Arc), and the mask is taken
    against the margined target. t = 1 is the base loss. Defaults s = 32,
    t = 1.2 (the authors' code).

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import sv_softmax_loss
      >>> cos = jnp.array([[0.5, 0.6, 0.1]])
      >>> labels = jnp.array([0])
      >>> loss = sv_softmax_loss(cos, labels, margin_type="cosface", margin=0.35)
      >>> loss.shape
      (1,)

    SV-Arc uses ArcFace with its θ > π - m fallback (FaceX-Zoo's MV-Arc uses the
    easy margin instead).

    References:
      Wang et al., "Support Vector Guided Softmax Loss for Face Recognition",
      arXiv 2018, https://arxiv.org/abs/1812.11317
    """
    stages = sv_softmax_stages(t=t, margin_type=margin_type, margin=margin, scale=scale)
    return margin_softmax_loss(cos, labels, stages=stages, where=where)


def mv_softmax_loss(
    cos: ArrayLike,
    labels: ArrayLike,
    *,
    scale: ArrayLike = 32.0,
    t: ArrayLike = 0.2,
    margin_type: str = "cosface",
    margin: ArrayLike = 0.35,
    mode: str = "adaptive",
    where=None,
) -> jax.Array:
    """MV-Softmax (MV-AM by default, MV-Arc with margin_type='arcface').

    Mis-classified vectors c_k > f(c_y) become c_k + t ('fixed') or
    (t + 1)·c_k + t ('adaptive', = SV-Softmax with t_SV = t + 1). t = 0 is the
    base loss. Defaults t = 0.2, m = 0.35, s = 32 (FaceX-Zoo).

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import mv_softmax_loss
      >>> mv_softmax_loss(jnp.array([[0.5, 0.6, 0.1]]), jnp.array([0])).shape
      (1,)

    References:
      Wang et al., "Mis-classified Vector Guided Softmax Loss for Face
      Recognition", AAAI 2020, https://arxiv.org/abs/1912.00833
    """
    stages = mv_softmax_stages(
        t=t, margin_type=margin_type, margin=margin, mode=mode, scale=scale
    )
    return margin_softmax_loss(cos, labels, stages=stages, where=where)


def eqm_loss(
    cos: ArrayLike,
    labels: ArrayLike,
    *,
    scale: ArrayLike,
    t1: ArrayLike,
    t2: ArrayLike,
    where=None,
) -> jax.Array:
    """EqM loss (reconstruction): log(1 + Σ_{j≠y} exp(s·[(c_j - t2)_+ + (t1 - c_y)_+])).

    The paper's formula was not available to us; this is a reconstruction from
    its description (Sun et al., IEEE TMM 2020): t1 is the lower bound on the
    intra-class similarity and t2 the upper bound on the inter-class similarity.
    No gradient reaches c_y once c_y >= t1, nor c_j once c_j <= t2; with both
    active it equals CosFace with m = t1 - t2. It is the margin softmax with
    target stage `eqm_target` and non-target stage `eqm_non_target`. All three
    hyperparameters are required (suggested: t1 - t2 = 0.35, s = 64).

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import eqm_loss
      >>> cos = jnp.array([[0.9, 0.1]])
      >>> loss = eqm_loss(cos, jnp.array([0]), scale=64.0, t1=0.6, t2=0.25)
      >>> round(float(loss[0]), 6)  # log 2: no hinge active
      0.693147
    """
    stages = eqm_stages(t1=t1, t2=t2, scale=scale)
    return margin_softmax_loss(cos, labels, stages=stages, where=where)


def curricularface_loss(
    cos: ArrayLike,
    labels: ArrayLike,
    state: CurricularState,
    *,
    scale: ArrayLike = 64.0,
    margin: ArrayLike = 0.5,
    where=None,
    axis_name: str | None = None,
) -> tuple[jax.Array, CurricularState]:
    """CurricularFace: ArcFace target, hard negatives re-weighted by c_k·(t + c_k).

    t is an EMA of the mean raw target cosine: t <- 0.01·mean_i c_{y_i} +
    0.99·t (from 0, `init_curricular_state`). As in the authors' code the new t
    is computed from this batch and used in this same step; it is returned as
    the new state. Hard negatives are c_k > f(c_y) with f the ArcFace target
    including its fallback (the reference code compares with cos(θ + m)).

    Args:
      cos: [B, C]; labels: [B]; state: `CurricularState`.
      scale: s = 64; margin: m = 0.5.
      where: optional bool [B] (padded rows don't enter the mean).
      axis_name: mean over the whole device axis when set.

    Returns:
      (loss [B], new `CurricularState`).

    Example:
      >>> import jax.numpy as jnp
      >>> import margin_jax as mj
      >>> cos = jnp.array([[0.9, 0.95], [0.2, 0.4]])
      >>> loss, state = mj.curricularface_loss(
      ...     cos, jnp.array([0, 1]), mj.init_curricular_state())
      >>> round(float(state.t), 4)
      0.0065

    References:
      Huang et al., CurricularFace, CVPR 2020, https://arxiv.org/abs/2004.00288
    """
    stages = curricularface_stages(margin=margin, scale=scale, state=state)
    return margin_softmax_loss(
        cos, labels, stages=stages, where=where, axis_name=axis_name
    )
