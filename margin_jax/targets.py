"""Stage 3, the target transforms f: the margin applied to the target cosine c_y.

Each function maps the target cosines [B] (or any shape) elementwise to the
margined target logit before scaling. They are the ``target_fn`` stage of
`margin_jax.margin_softmax_loss`; bind hyperparameters with `functools.partial`.
Margins are in radians (pytorch-metric-learning's ArcFaceLoss takes degrees).
Hyperparameters may be traced (scheduled under jit), except those documented as
static (SphereFace's integer ``margin``, ``easy_margin``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from margin_jax import _checks
from margin_jax.cosine import safe_arccos, safe_sin

__all__ = [
    "normface_target",
    "cosface_target",
    "arcface_target",
    "straight_through",
    "combined_target",
    "chebyshev_cos",
    "chebyshev_sin",
    "sphereface_psi",
    "sphereface_target",
    "sphereface_lambda",
    "eqm_target",
]

TargetFn = Callable[[jax.Array], jax.Array]

_sg = jax.lax.stop_gradient


def _as_float(c: ArrayLike) -> jax.Array:
    c = jnp.asarray(c)
    return c.astype(_checks.compute_dtype(c))


def normface_target(c: ArrayLike) -> jax.Array:
    """NormFace / normalised softmax: f(c) = c (no margin).

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import normface_target
      >>> normface_target(jnp.array([0.5])).tolist()
      [0.5]

    References:
      Wang et al., "NormFace: L2 Hypersphere Embedding for Face Verification",
      ACM MM 2017, https://arxiv.org/abs/1704.06369
    """
    return _as_float(c)


def cosface_target(c: ArrayLike, *, margin: ArrayLike = 0.35) -> jax.Array:
    """CosFace / AM-Softmax additive cosine margin: f(c) = c - m.

    Args:
      c: target cosines, any shape (usually [B]).
      margin: m, default 0.35 (CosFace; the AM-Softmax paper also uses 0.35).

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import cosface_target
      >>> round(float(cosface_target(jnp.array(0.5), margin=0.35)), 6)
      0.15

    References:
      Wang et al., "CosFace: Large Margin Cosine Loss", CVPR 2018,
      https://arxiv.org/abs/1801.09414 ; Wang et al., "Additive Margin Softmax",
      IEEE SPL 2018, https://arxiv.org/abs/1801.05599
    """
    c = _as_float(c)
    return c - jnp.asarray(margin, c.dtype)


def arcface_target(
    c: ArrayLike, *, margin: ArrayLike = 0.5, easy_margin: bool = False
) -> jax.Array:
    """ArcFace additive angular margin: f(c) = cos(θ + m).

    cos(θ + m) = c·cos m - sin θ·sin m with sin θ = sqrt(1 - c²) computed safely
    (finite gradient at c = ±1). Where θ > π - m, cos(θ + m) would turn back up,
    so f(c) = c - m·sin m there instead (keeps f monotone; the jump at θ = π - m
    is harmless, as in insightface). With ``easy_margin`` the margin applies only
    where c > 0 and f(c) = c elsewhere (no fallback then). The branch conditions
    carry no gradient.

    Args:
      c: target cosines, any shape.
      margin: m in radians, default 0.5 (pytorch-metric-learning's ArcFaceLoss
        takes degrees, 28.6).
      easy_margin: static Python bool.

    Returns:
      f(c), same shape, compute dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import arcface_target
      >>> round(float(arcface_target(jnp.array(1.0), margin=0.5)), 5)  # cos(0.5)
      0.87758

    This computes the exact gradient of cos(θ + m); current insightface computes
    the value under no_grad and passes the plain cosine's gradient: wrap with
    `straight_through` (or ``arcface_loss(..., straight_through=True)``) for that.

    References:
      Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face
      Recognition", CVPR 2019, https://arxiv.org/abs/1801.07698
    """
    c = _as_float(c)
    m = jnp.asarray(margin, c.dtype)
    cos_m, sin_m = jnp.cos(m), jnp.sin(m)
    shifted = c * cos_m - safe_sin(c) * sin_m
    if easy_margin:
        return jnp.where(_sg(c) > 0, shifted, c)
    return jnp.where(_sg(c) >= -_sg(cos_m), shifted, c - m * sin_m)


def straight_through(target_fn: TargetFn) -> TargetFn:
    """Value of ``target_fn``, gradient of the identity: c + sg(f(c) - c).

    This is what current insightface computes for ArcFace (the angle arithmetic
    runs under ``torch.no_grad``), so the margin changes the forward logits but
    the target cosine receives the gradient of plain NormFace.

    Example:
      >>> import functools, jax, jax.numpy as jnp
      >>> from margin_jax import arcface_target, straight_through
      >>> f = straight_through(functools.partial(arcface_target, margin=0.5))
      >>> float(jax.grad(f)(jnp.array(0.3)))
      1.0
    """

    def wrapped(c: ArrayLike) -> jax.Array:
        c = _as_float(c)
        return c + _sg(target_fn(c) - c)

    return wrapped


def _static_integer(x) -> int | None:
    """``x`` as a Python int when it is a concrete integral value, else None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, int | np.integer):
        return int(x)
    if isinstance(x, float | np.floating):
        return int(x) if float(x).is_integer() else None
    if _checks.is_concrete(x) and np.ndim(x) == 0:
        value = float(np.asarray(x))
        return int(value) if value.is_integer() else None
    return None


def _binom(n: int, k: int) -> float:
    return float(math.comb(n, k))


def _ipow(x: jax.Array, k: int) -> jax.Array:
    """x**k for a static int k >= 0, with x**0 = 1 (and no 0·inf in its gradient)."""
    return jnp.ones_like(x) if k == 0 else x**k


def chebyshev_cos(c: ArrayLike, m: int) -> jax.Array:
    """cos(mθ) as a polynomial in c = cos θ (Chebyshev T_m), integer m >= 0.

    cos(mθ) = Σ_{n=0}^{⌊m/2⌋} (-1)^n C(m, 2n) c^(m-2n) (1 - c²)^n, the general form
    of T2 = 2c² - 1, T3 = 4c³ - 3c, T4 = 8c⁴ - 8c² + 1 (SphereFace, eq. 7). No
    square root, so it is smooth at c = ±1.

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import chebyshev_cos
      >>> round(float(chebyshev_cos(jnp.array(0.5), 2)), 6)  # 2c² - 1
      -0.5
    """
    c = _as_float(c)
    s2 = 1.0 - jnp.square(c)
    return sum(
        (-1) ** n * _binom(m, 2 * n) * _ipow(c, m - 2 * n) * _ipow(s2, n)
        for n in range(m // 2 + 1)
    )


def chebyshev_sin(c: ArrayLike, m: int) -> jax.Array:
    """sin(mθ) = sin θ · U_{m-1}(c) for c = cos θ, integer m >= 0.

    sin(mθ) = sin θ · Σ_{n=0}^{⌊(m-1)/2⌋} (-1)^n C(m, 2n+1) c^(m-2n-1) (1 - c²)^n,
    with sin θ from `safe_sin`.

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import chebyshev_sin
      >>> round(float(chebyshev_sin(jnp.array(0.0), 2)), 6)  # sin(2·π/2)
      0.0
    """
    c = _as_float(c)
    s2 = 1.0 - jnp.square(c)
    poly = sum(
        (-1) ** n * _binom(m, 2 * n + 1) * _ipow(c, m - 2 * n - 1) * _ipow(s2, n)
        for n in range((m - 1) // 2 + 1)
    )
    return safe_sin(c) * poly if m > 0 else jnp.zeros_like(c)


def combined_target(
    c: ArrayLike, *, m1: ArrayLike = 1.0, m2: ArrayLike = 0.3, m3: ArrayLike = 0.2
) -> jax.Array:
    """Combined margin (insightface): f(c) = cos(m1·θ + m2) - m3.

    All three terms are honoured. A concrete integral ``m1`` uses the Chebyshev
    form cos(m1θ)cos m2 - sin(m1θ)sin m2 (no arccos); any other ``m1`` (also a
    traced one) uses θ = `safe_arccos`(c). Where m1·θ + m2 > π, the cosine would
    turn back up, so f(c) = c - K - m3 with K = max(m2·sin m2,
    1 + cos((π - m2)/m1)), which keeps f monotone and is ArcFace's c - m·sin m
    when m1 = 1. Hence combined(1, m, 0) == ArcFace(m) and
    combined(1, 0, m) == CosFace(m) exactly.

    Args:
      c: target cosines, any shape.
      m1: multiplicative angular margin (SphereFace-like), > 0.
      m2: additive angular margin (ArcFace-like), radians.
      m3: additive cosine margin (CosFace-like).

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import combined_target
      >>> round(float(combined_target(jnp.array(1.0), m1=1.0, m2=0.0, m3=0.35)), 6)
      0.65

    Differs from insightface's CombinedMarginLoss, which (in its PyTorch code)
    applies only m3 when m3 > 0 and drops m1 and m2, and has no fallback.

    References:
      Deng et al., ArcFace, CVPR 2019, section 3.3 and Figure 4,
      https://arxiv.org/abs/1801.07698
    """
    c = _as_float(c)
    dtype = c.dtype
    m2_, m3_ = jnp.asarray(m2, dtype), jnp.asarray(m3, dtype)
    n = _static_integer(m1)
    if n is not None and n >= 1:
        main = chebyshev_cos(c, n) * jnp.cos(m2_) - chebyshev_sin(c, n) * jnp.sin(m2_)
    else:
        main = jnp.cos(jnp.asarray(m1, dtype) * safe_arccos(c) + m2_)
    m1_ = jnp.asarray(m1, dtype)
    safe_m1 = jnp.where(m1_ > 0, m1_, 1.0)
    k = jnp.maximum(m2_ * jnp.sin(m2_), 1.0 + jnp.cos((jnp.pi - m2_) / safe_m1))
    in_range = _sg(m1_ * safe_arccos(c) + m2_) <= jnp.pi
    return jnp.where(in_range, main, c - k) - m3_


def check_sphere_margin(margin, fn: str) -> int:
    if not _checks.is_int(margin):
        raise TypeError(
            f"{fn}: `margin` must be a Python int >= 1 (the multiplicative angular "
            f"margin m of A-Softmax, a static value); got {type(margin).__name__} "
            f"{margin!r}. For a non-integer multiplicative margin use "
            "combined_target(m1=...)."
        )
    if margin < 1:
        raise ValueError(f"{fn}: `margin` must be >= 1, got {margin}.")
    return int(margin)


def sphereface_psi(c: ArrayLike, *, margin: int = 4) -> jax.Array:
    """A-Softmax's monotone angular function ψ(θ) = (-1)^k cos(mθ) - 2k.

    k = floor(mθ/π) ∈ [0, m - 1], computed without gradient; cos(mθ) is the
    Chebyshev polynomial of c (`chebyshev_cos`). ψ decreases from 1 at θ = 0 to
    1 - 2m at θ = π and is continuous.

    Args:
      c: target cosines, any shape.
      margin: m, a static Python int >= 1 (default 4, as SphereFace).

    Raises:
      TypeError: ``margin`` is not a Python int (a float such as 4.0 included).

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import sphereface_psi
      >>> float(sphereface_psi(jnp.array(-1.0), margin=4))  # 1 - 2m at θ = π
      -7.0

    References:
      Liu et al., "SphereFace: Deep Hypersphere Embedding for Face Recognition",
      CVPR 2017, https://arxiv.org/abs/1704.08063
    """
    m = check_sphere_margin(margin, "sphereface_psi")
    c = _as_float(c)
    theta = safe_arccos(_sg(c))
    k = jnp.clip(jnp.floor(m * theta / jnp.pi), 0, m - 1)
    sign = 1.0 - 2.0 * jnp.mod(k, 2)
    return sign * chebyshev_cos(c, m) - 2.0 * k


def sphereface_target(
    c: ArrayLike, *, margin: int = 4, lambda_: ArrayLike = 0.0
) -> jax.Array:
    """A-Softmax target with the annealing blend: f(c) = (λ·c + ψ(θ)) / (1 + λ).

    λ = 0 gives pure ψ; a large λ gives nearly plain softmax. Schedule λ with
    `sphereface_lambda`.

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import sphereface_target
      >>> float(sphereface_target(jnp.array(1.0), margin=4, lambda_=5.0))
      1.0
    """
    c = _as_float(c)
    lam = jnp.asarray(lambda_, c.dtype)
    return (lam * c + sphereface_psi(c, margin=margin)) / (1.0 + lam)


def sphereface_lambda(
    step: ArrayLike,
    *,
    base: ArrayLike = 1000.0,
    gamma: ArrayLike = 0.12,
    power: ArrayLike = 1.0,
    lambda_min: ArrayLike = 5.0,
) -> jax.Array:
    """SphereFace's λ schedule: max(λ_min, base·(1 + γ·step)^(-power)).

    Defaults are the SphereFace Caffe prototxt's (base 1000, gamma 0.12,
    power 1, lambda_min 5).

    Example:
      >>> from margin_jax import sphereface_lambda
      >>> float(sphereface_lambda(0)), float(sphereface_lambda(10_000))
      (1000.0, 5.0)
    """
    step = jnp.asarray(step, jnp.float32)
    lam = jnp.asarray(base, jnp.float32) * (1.0 + gamma * step) ** (-jnp.asarray(power))
    return jnp.maximum(jnp.asarray(lambda_min, jnp.float32), lam)


def eqm_target(c: ArrayLike, *, t1: ArrayLike) -> jax.Array:
    """EqM target stage: f(c) = -(t1 - c)_+ (no gradient once c >= t1).

    With `margin_jax.eqm_non_target` as the non-target stage, the margin softmax
    gives the EqM loss of `margin_jax.eqm_loss`.

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax import eqm_target
      >>> [round(float(v), 4) for v in eqm_target(jnp.array([0.9, 0.2]), t1=0.5)]
      [-0.0, -0.3]
    """
    c = _as_float(c)
    return -jax.nn.relu(jnp.asarray(t1, c.dtype) - c)
