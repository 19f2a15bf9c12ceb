"""Every margin-softmax loss against the float64 loop reference (tests/reference.py).

Each case feeds the implementation float32 cosines and the reference the very same
values cast to float64, then compares the per-example loss and the gradient
w.r.t. the cosines (or logits, or embeddings and class weights). The grid of
target angles covers θ = 0 and θ = π (values compared, gradient only required to
be finite there), points just either side of every branch switch (π - m for
ArcFace, (π - m2)/m1 for the combined margin, kπ/m for SphereFace, ...), and
random non-target cosines, some above the margined target so that the
support-vector and hard-negative masks are active. Two padded rows (`where`
False) in every batch must give exactly 0 loss and 0 gradient.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from margin_jax import adaptive, cosine, losses, margins, masks

try:
    from tests import reference as ref
except ImportError:  # tests/ is not a package: pytest puts it on sys.path.
    import reference as ref

NUM_CLASSES = 6
NUM_PAD = 2
# Extra target angles whose rows have every non-target well below the target.
SEPARATED_ANGLES = (0.0, 0.02, 0.3, 0.6, 1.0, 1.3, 2.0)
PI = math.pi

# float32 arithmetic on O(1) cosines scaled by s: the loss is a difference of
# O(s) numbers, so its absolute error grows with s.
LOSS_RTOL = 1e-5
GRAD_RTOL = 2e-4


def _loss_atol(scale: float) -> float:
    return 1e-6 * max(1.0, scale)


def _grad_atol(scale: float) -> float:
    return 1e-6 * max(1.0, scale)


# ---------------------------------------------------------------------------
# Data.


def _target_grid(boundaries: Sequence[float], rng: np.random.Generator) -> list:
    """Target angles: the ends, both sides of each branch switch, random fill."""
    fixed = [0.0, 1e-3, 0.05, 0.4, 1.0, 1.3, 2.0, 2.6, PI - 0.05, PI - 1e-3, PI]
    for b in boundaries:
        fixed += [b - 1e-2, b - 1e-3, b + 1e-3, b + 1e-2]
    fixed = [min(PI, max(0.0, a)) for a in fixed]
    kinks = [0.0, PI, *boundaries]
    out = list(fixed)
    while len(out) < len(fixed) + 5:
        a = float(rng.uniform(0.0, PI))
        if min(abs(a - k) for k in kinks) > 2e-2:
            out.append(a)
    return out


def _nudge_away(value: np.float32, kinks: Sequence[float], gap: float) -> np.float32:
    """Move a float32 non-target cosine at least `gap` away from every kink."""
    v = float(value)
    for _ in range(8):
        close = [k for k in kinks if abs(v - k) < gap]
        if not close:
            return np.float32(v)
        k = close[0]
        v = k + 2 * gap if k + 2 * gap <= 1.0 else k - 2 * gap
        v = float(np.float32(v))
    raise AssertionError("could not place a non-target cosine away from kinks")


def make_cos_batch(
    *,
    boundaries: Sequence[float] = (),
    target_value: Callable[[float], float] = lambda c: c,
    non_target_kinks: Callable[[float], Sequence[float]] = lambda t: (),
    seed: int = 0,
):
    """float32 cos [B, C], int32 labels [B], bool where [B] (last rows padded).

    `target_value(c_y)` is the reference margined target T (used to plant
    non-targets above it and to keep every non-target away from the strict
    mask comparison `c_k > T`); `non_target_kinks(T)` lists every non-target
    value where g has a kink.
    """
    rng = np.random.default_rng(seed)
    angles = _target_grid(boundaries, rng)
    n_mixed = len(angles)
    angles += list(SEPARATED_ANGLES)
    n_valid = len(angles)
    b = n_valid + NUM_PAD
    labels = rng.integers(0, NUM_CLASSES, size=b).astype(np.int32)
    cos = rng.uniform(-1.0, 1.0, size=(b, NUM_CLASSES)).astype(np.float32)
    for i in range(b):
        y = labels[i]
        angle = angles[i] if i < n_valid else rng.uniform(0.0, PI)
        cy = np.float32(math.cos(angle))
        if angle == 0.0:
            cy = np.float32(1.0)
        elif angle == PI:
            cy = np.float32(-1.0)
        cos[i, y] = cy
        others = [k for k in range(NUM_CLASSES) if k != y]
        t = target_value(float(cy))
        # One non-target just above the margined target (mask active whenever
        # T < 1), one anywhere above it.
        lo = min(max(t, -1.0), 1.0)
        if n_mixed <= i < n_valid:
            # Well separated: every non-target far below T, tiny loss.
            cos[i, others] = rng.uniform(-1.0, max(-1.0, t - 0.3), size=len(others))
        else:
            cos[i, others[0]] = np.float32(min(1.0, lo + abs(rng.normal(0.0, 0.1))))
            cos[i, others[1]] = np.float32(rng.uniform(lo, 1.0))
        if i % 5 == 3 and i < n_mixed:  # exact extremes among the non-targets too
            cos[i, others[2]] = np.float32(1.0)
            cos[i, others[3]] = np.float32(-1.0)
        kinks = [t, *non_target_kinks(t)]
        for k in others:
            cos[i, k] = _nudge_away(cos[i, k], kinks, 1e-3)
    where = np.arange(b) < n_valid
    return cos, labels, where


# ---------------------------------------------------------------------------
# Comparison helpers.


def _weights(b: int, seed: int = 1) -> np.ndarray:
    """Random cotangent: checks per-example gradients, not just their sum."""
    return np.random.default_rng(seed).uniform(0.5, 1.5, size=b).astype(np.float32)


def assert_loss_close(got, want, where, *, scale, rtol=LOSS_RTOL, atol=None):
    got = np.asarray(got)
    assert got.dtype == np.float32, got.dtype
    assert got.shape == want.shape, (got.shape, want.shape)
    where = np.asarray(where, bool)
    np.testing.assert_array_equal(got[~where], 0.0, err_msg="padded rows")
    atol = _loss_atol(scale) if atol is None else atol
    np.testing.assert_allclose(
        got[where].astype(np.float64), want[where], rtol=rtol, atol=atol
    )


def assert_grad_close(got, want, where, *, scale, rtol=GRAD_RTOL, atol=None):
    """NaN entries of `want` (undefined derivative at c = ±1) need only be finite."""
    got = np.asarray(got).astype(np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    where = np.asarray(where, bool)
    np.testing.assert_array_equal(got[~where], 0.0, err_msg="padded rows")
    assert np.all(np.isfinite(got)), np.argwhere(~np.isfinite(got))
    atol = _grad_atol(scale) if atol is None else atol
    defined = ~np.isnan(want) & where[:, None]
    np.testing.assert_allclose(got[defined], want[defined], rtol=rtol, atol=atol)


@functools.partial(jax.jit, static_argnums=0)
def _value_and_vjp(fn, x, labels, where, v):
    loss, vjp = jax.vjp(lambda x_: fn(x_, labels, where), x)
    return loss, vjp(v)[0]


def check_case(impl, want_fn, x, labels, where, *, scale, loss_kw=None, grad_kw=None):
    """Compare impl(x, labels, where) -> [B] and its VJP with the reference."""
    v = _weights(len(labels))
    loss, grad = _value_and_vjp(impl, jnp.asarray(x), labels, where, v)
    want_loss, want_grad = want_fn(np.asarray(x, np.float64), labels, where)[:2]
    assert_loss_close(loss, want_loss, where, scale=scale, **(loss_kw or {}))
    assert_grad_close(
        grad,
        v.astype(np.float64)[:, None] * want_grad,
        where,
        scale=scale,
        **(grad_kw or {}),
    )


# ---------------------------------------------------------------------------
# Loss cases on cosines.


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    impl: Callable  # (cos, labels, where) -> loss [B]
    want: Callable  # (cos64, labels, where) -> (loss [B], grad [B, C])
    scale: float
    boundaries: tuple = ()
    target_value: Callable = lambda c: c
    non_target_kinks: Callable = lambda t: ()


def _val(fn, **kw):
    return lambda c: fn(c, **kw)[0]


def _named_cases() -> list[Case]:
    cases = [
        Case(
            "normface",
            _with_where(losses.normface_loss),
            _with_where(ref.normface_loss),
            64.0,
        ),
        Case(
            "normface_s10",
            lambda c, y, w: losses.normface_loss(c, y, scale=10.0, where=w),
            lambda c, y, w: ref.normface_loss(c, y, scale=10.0, where=w),
            10.0,
        ),
        Case(
            "cosface",
            _with_where(losses.cosface_loss),
            _with_where(ref.cosface_loss),
            64.0,
            target_value=_val(ref.cosface_target, margin=0.35),
        ),
        Case(
            "cosface_s30_m0.4",
            lambda c, y, w: losses.cosface_loss(c, y, scale=30.0, margin=0.4, where=w),
            lambda c, y, w: ref.cosface_loss(c, y, scale=30.0, margin=0.4, where=w),
            30.0,
            target_value=_val(ref.cosface_target, margin=0.4),
        ),
    ]
    for kw, bounds in [
        ({}, (PI - 0.5,)),
        ({"margin": 0.3, "scale": 30.0}, (PI - 0.3,)),
        ({"easy_margin": True}, (PI / 2,)),
        ({"straight_through": True}, (PI - 0.5,)),
    ]:
        name = "arcface" + "".join(f"_{k}={v}" for k, v in kw.items())
        ref_kw = {k: v for k, v in kw.items() if k != "scale"}
        cases.append(
            Case(
                name,
                _with_where(losses.arcface_loss, **kw),
                _with_where(ref.arcface_loss, **kw),
                kw.get("scale", 64.0),
                boundaries=bounds,
                target_value=_val(ref.arcface_target, **ref_kw),
            )
        )
    for m1, m2, m3 in [(1.0, 0.3, 0.2), (2, 0.3, 0.2), (1.5, 0.3, 0.2), (3, 0.1, 0.1)]:
        kw = {"m1": m1, "m2": m2, "m3": m3}
        cases.append(
            Case(
                f"combined_m1={m1}_m2={m2}_m3={m3}",
                _with_where(losses.combined_margin_loss, **kw),
                _with_where(ref.combined_margin_loss, **kw),
                64.0,
                boundaries=((PI - m2) / m1,),
                target_value=_val(ref.combined_target, **kw),
            )
        )
    for m in (1, 2, 3, 4, 5):
        for lam in (0.0, 5.0):
            bounds = tuple(k * PI / m for k in range(1, m))
            for original in (False, True):
                form = "original" if original else "normalised"
                cases.append(
                    Case(
                        f"sphereface_m={m}_lambda={lam}_{form}",
                        functools.partial(
                            _sphereface_impl, margin=m, lambda_=lam, original=original
                        ),
                        functools.partial(
                            _sphereface_ref, margin=m, lambda_=lam, original=original
                        ),
                        64.0,
                        boundaries=bounds,
                        target_value=_val(ref.sphereface_target, margin=m, lambda_=lam),
                    )
                )
    fixed_s = ref.adacos_fixed_scale(NUM_CLASSES)
    cases += [
        Case(
            "adacos_fixed",
            lambda c, y, w: losses.adacos_loss(
                c, y, scale=adaptive.adacos_fixed_scale(NUM_CLASSES), where=w
            ),
            _with_where(ref.adacos_loss, scale=fixed_s),
            fixed_s,
        ),
        Case(
            "adacos_dynamic",
            lambda c, y, w: losses.adacos_loss(
                c,
                y,
                scale=adaptive.adacos_dynamic_scale(c, y, 10.0, where=w),
                where=w,
            ),
            lambda c, y, w: ref.adacos_loss(
                c,
                y,
                scale=ref.adacos_dynamic_scale(c, y, 10.0, where=w),
                where=w,
            ),
            20.0,
        ),
    ]
    for margin_type, margin in [("none", 0.0), ("cosface", 0.35), ("arcface", 0.5)]:
        tv = ref._margin_type_target(margin_type, margin)
        bounds = (PI - margin,) if margin_type == "arcface" else ()
        for t in (1.0, 1.2):
            kw = {"t": t, "margin_type": margin_type, "margin": margin}
            cases.append(
                Case(
                    f"sv_{margin_type}_t={t}",
                    _with_where(losses.sv_softmax_loss, **kw),
                    _with_where(ref.sv_softmax_loss, **kw),
                    32.0,
                    boundaries=bounds,
                    target_value=lambda c, tv=tv: tv(c)[0],
                )
            )
    for mode, margin_type, margin, t in [
        ("fixed", "cosface", 0.35, 0.2),
        ("adaptive", "cosface", 0.35, 0.2),
        ("adaptive", "arcface", 0.5, 0.3),
        ("fixed", "none", 0.0, 0.25),
    ]:
        tv = ref._margin_type_target(margin_type, margin)
        bounds = (PI - margin,) if margin_type == "arcface" else ()
        kw = {"t": t, "margin_type": margin_type, "margin": margin, "mode": mode}
        cases.append(
            Case(
                f"mv_{mode}_{margin_type}_t={t}",
                _with_where(losses.mv_softmax_loss, **kw),
                _with_where(ref.mv_softmax_loss, **kw),
                32.0,
                boundaries=bounds,
                target_value=lambda c, tv=tv: tv(c)[0],
            )
        )
    for s, t1, t2 in [(64.0, 0.5, 0.15), (32.0, 0.8, 0.3)]:
        kw = {"scale": s, "t1": t1, "t2": t2}
        cases.append(
            Case(
                f"eqm_s={s}_t1={t1}_t2={t2}",
                lambda c, y, w, kw=kw: losses.eqm_loss(c, y, where=w, **kw),
                lambda c, y, w, kw=kw: ref.eqm_loss(c, y, where=w, **kw),
                s,
                boundaries=(math.acos(t1),),
                non_target_kinks=lambda t, t2=t2: (t2,),
            )
        )
    # Focal on margin logits (p from ArcFace logits), chained back to cos.
    cases.append(
        Case(
            "focal_on_arcface_logits",
            _focal_margin_impl,
            _focal_margin_ref,
            64.0,
            boundaries=(PI - 0.5,),
            target_value=_val(ref.arcface_target),
        )
    )
    cases += _composer_cases()
    return cases


def _with_where(loss_fn, **kw):
    """``loss_fn(c, y, where=w, **kw)`` with the (c, y, w) signature of a Case."""
    return lambda c, y, w: loss_fn(c, y, where=w, **kw)


def _feature_norms(b: int) -> np.ndarray:
    return np.random.default_rng(7).uniform(2.0, 30.0, size=b).astype(np.float32)


def _sphereface_impl(c, y, w, *, margin, lambda_, original):
    if original:
        norms = jnp.asarray(_feature_norms(c.shape[0]))
        return losses.sphereface_loss(
            c, y, margin=margin, lambda_=lambda_, feature_norm=norms, where=w
        )
    return losses.sphereface_loss(c, y, margin=margin, lambda_=lambda_, where=w)


def _sphereface_ref(c, y, w, *, margin, lambda_, original):
    norms = _feature_norms(c.shape[0]).astype(np.float64) if original else None
    return ref.sphereface_loss(
        c, y, margin=margin, lambda_=lambda_, feature_norm=norms, where=w
    )[:2]


def _focal_margin_impl(c, y, w):
    logits = losses.margin_logits(
        c,
        y,
        target_fn=functools.partial(margins.arcface_target, margin=0.5),
        scale=64.0,
    )
    return losses.focal_loss(logits, y, gamma=2.0, where=w)


def _focal_margin_ref(c, y, w):
    z, dz = ref.margin_logits(
        c, y, target_fn=functools.partial(ref.arcface_target, margin=0.5), scale=64.0
    )
    loss, gz = ref.focal_loss(z, y, gamma=2.0, where=w)
    return loss, ref.chain_through_logits(gz, dz)


def _composer_cases() -> list[Case]:
    """margin_softmax_loss with explicit stage functions."""
    p = functools.partial
    specs = [
        (
            "compose_combined2_mvfixed",
            p(margins.combined_target, m1=2, m2=0.2, m3=0.1),
            p(masks.mv_non_target, t=0.3, mode="fixed"),
            p(ref.combined_target, m1=2, m2=0.2, m3=0.1),
            p(ref.mv_non_target, t=0.3, mode="fixed"),
            ((PI - 0.2) / 2,),
        ),
        (
            "compose_sphereface3_sv",
            p(margins.sphereface_target, margin=3, lambda_=2.0),
            p(masks.sv_non_target, t=1.3),
            p(ref.sphereface_target, margin=3, lambda_=2.0),
            p(ref.sv_non_target, t=1.3),
            (PI / 3, 2 * PI / 3),
        ),
        (
            "compose_straight_through_arcface_curricular",
            margins.straight_through(p(margins.arcface_target, margin=0.4)),
            p(masks.curricular_non_target, t=0.3),
            p(ref.arcface_target, margin=0.4, straight_through=True),
            p(ref.curricular_non_target, t=0.3),
            (PI - 0.4,),
        ),
        (
            "compose_eqm",
            p(margins.eqm_target, t1=0.6),
            p(masks.eqm_non_target, t2=0.2),
            p(ref.eqm_target, t1=0.6),
            p(ref.eqm_non_target, t2=0.2),
            (math.acos(0.6),),
        ),
        (
            "compose_cosface_identity",
            p(margins.cosface_target, margin=0.2),
            None,
            p(ref.cosface_target, margin=0.2),
            None,
            (),
        ),
    ]
    out = []
    for name, f_impl, g_impl, f_ref, g_ref, bounds in specs:
        kinks = (lambda t: (0.2,)) if name == "compose_eqm" else (lambda t: ())
        out.append(
            Case(
                name,
                lambda c, y, w, f=f_impl, g=g_impl: losses.margin_softmax_loss(
                    c, y, target_fn=f, non_target_fn=g, scale=48.0, where=w
                ),
                lambda c, y, w, f=f_ref, g=g_ref: ref.margin_softmax_loss(
                    c, y, target_fn=f, non_target_fn=g, scale=48.0, where=w
                ),
                48.0,
                boundaries=bounds,
                target_value=lambda c, f=f_ref: f(c)[0],
                non_target_kinks=kinks,
            )
        )
    return out


CASES = _named_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_loss_and_grad_match_reference(case: Case):
    cos, labels, where = make_cos_batch(
        boundaries=case.boundaries,
        target_value=case.target_value,
        non_target_kinks=case.non_target_kinks,
    )
    check_case(case.impl, case.want, cos, labels, where, scale=case.scale)


@pytest.mark.parametrize("t", [1.2, 1.0])
def test_sv_tie_is_not_a_support_vector(t):
    """c_k == T exactly (f = identity) is not a support vector: strict >."""
    cos, labels, where = make_cos_batch(seed=8)
    for i in range(0, len(labels), 2):
        y = labels[i]
        cos[i, (y + 1) % NUM_CLASSES] = cos[i, y]
        cos[i, (y + 2) % NUM_CLASSES] = np.nextafter(cos[i, y], np.float32(2))
    for kw in ({"t": t}, {"t": t - 1.0, "mode": "fixed", "margin_type": "none"}):
        impl = losses.sv_softmax_loss if "mode" not in kw else losses.mv_softmax_loss
        want = ref.sv_softmax_loss if "mode" not in kw else ref.mv_softmax_loss
        check_case(
            lambda c, y, w, impl=impl, kw=kw: impl(c, y, where=w, **kw),
            lambda c, y, w, want=want, kw=kw: want(c, y, where=w, **kw),
            cos,
            labels,
            where,
            scale=32.0,
        )


def test_grid_activates_masks():
    """The data really exercises support vectors, fallbacks and both ends."""
    cos, labels, where = make_cos_batch(
        boundaries=(PI - 0.5,), target_value=_val(ref.arcface_target)
    )
    target = [ref.arcface_target(float(cos[i, labels[i]]))[0] for i in range(len(cos))]
    mask = ref.support_vector_mask(cos, labels, target)
    mixed = np.flatnonzero(where)[: -len(SEPARATED_ANGLES)]
    assert mask[mixed].sum(axis=1).min() >= 1
    assert not mask[np.flatnonzero(where)[-len(SEPARATED_ANGLES) :]].any()
    cy = cos[np.arange(len(cos)), labels]
    assert 1.0 in cy and -1.0 in cy
    assert np.any(cy < -math.cos(0.5)) and np.any((cy > -math.cos(0.5)) & (cy < -0.8))


# ---------------------------------------------------------------------------
# Curricular face: value, gradient and the state update.


@pytest.mark.parametrize("t_old", [0.0, 0.35])
def test_curricularface_matches_reference(t_old):
    cos, labels, where = make_cos_batch(
        boundaries=(PI - 0.5,), target_value=_val(ref.arcface_target)
    )
    v = _weights(len(labels))

    @jax.jit
    def run(c, v):
        state = adaptive.CurricularState(t=jnp.asarray(t_old, jnp.float32))
        fn = functools.partial(losses.curricularface_loss, where=where)
        (loss, vjp, new_state) = jax.vjp(
            lambda c_: fn(c_, labels, state), c, has_aux=True
        )
        return loss, vjp(v)[0], new_state

    loss, grad, new_state = run(jnp.asarray(cos), v)
    want_loss, want_grad, t_new = ref.curricularface_loss(
        cos.astype(np.float64), labels, t_old, where=where
    )
    assert isinstance(new_state, adaptive.CurricularState)
    np.testing.assert_allclose(float(new_state.t), t_new, rtol=1e-6, atol=1e-7)
    assert_loss_close(loss, want_loss, where, scale=64.0)
    assert_grad_close(grad, v[:, None] * want_grad, where, scale=64.0)


def test_curricular_initial_state():
    assert float(adaptive.init_curricular_state().t) == 0.0


def test_curricular_state_ignores_padded_rows():
    cos, labels, where = make_cos_batch(seed=3)
    cos[~where] = 0.999  # garbage in padded rows must not move t
    state = adaptive.init_curricular_state()
    _, new_state = jax.jit(
        lambda c: losses.curricularface_loss(c, labels, state, where=where)
    )(jnp.asarray(cos))
    _, _, t_new = ref.curricularface_loss(cos, labels, 0.0, where=where)
    np.testing.assert_allclose(float(new_state.t), t_new, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------
# Mining losses on plain logits.


def _logits_batch(seed: int = 0, n_valid: int = 9):
    rng = np.random.default_rng(seed)
    b = n_valid + NUM_PAD
    logits = (3.0 * rng.normal(size=(b, NUM_CLASSES))).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=b).astype(np.int32)
    where = np.arange(b) < n_valid
    return logits, labels, where


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.0])
def test_focal_loss_matches_reference(gamma):
    logits, labels, where = _logits_batch()
    check_case(
        _with_where(losses.focal_loss, gamma=gamma),
        _with_where(ref.focal_loss, gamma=gamma),
        logits,
        labels,
        where,
        scale=1.0,
    )


def test_softmax_loss_matches_reference():
    logits, labels, where = _logits_batch(seed=4)
    check_case(
        _with_where(losses.softmax_loss),
        _with_where(ref.softmax_loss),
        logits,
        labels,
        where,
        scale=1.0,
    )


def test_focal_weight_matches_reference():
    logits, labels, _ = _logits_batch(seed=5)
    for gamma in (0.5, 2.0):
        got = masks.focal_weight(jnp.asarray(logits), labels, gamma=gamma)
        want = ref.focal_weight(logits.astype(np.float64), labels, gamma=gamma)
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-7)


# n_valid = 9: r·n = 2.7, 4.5, 8.1 and 9 (never within rounding of an integer
# except the exact r = 1).
@pytest.mark.parametrize("keep_ratio", [0.3, 0.5, 0.9, 1.0])
def test_hard_mining_loss_matches_reference(keep_ratio):
    logits, labels, where = _logits_batch(seed=1)
    check_case(
        _with_where(losses.hard_mining_loss, keep_ratio=keep_ratio),
        _with_where(ref.hard_mining_loss, keep_ratio=keep_ratio),
        logits,
        labels,
        where,
        scale=1.0,
    )


def _tied_logits():
    """Rows 1, 3, 4, 6 identical (tied CE); rows 0 and 5 have larger CE."""
    logits, labels, where = _logits_batch(seed=2)
    tied = np.array([2.0, 0.5, -1.0, 0.0, 1.0, -0.5], np.float32)
    for i in (1, 3, 4, 6):
        logits[i], labels[i] = tied, 1
    for i in (0, 5):
        logits[i], labels[i] = tied, 2
    for i in (2, 7, 8):
        logits[i], labels[i] = tied, 0
    return logits, labels, where


@pytest.mark.parametrize("keep_ratio", [0.3, 0.5])
def test_hard_mining_ties_go_to_lower_index(keep_ratio):
    logits, labels, where = _tied_logits()
    keep = ref.hard_mining_mask(
        ref.softmax_loss(logits.astype(np.float64), labels, where=where)[0],
        keep_ratio=keep_ratio,
        where=where,
    )
    # floor(0.3·9) = 2: rows 0, 5. floor(0.5·9) = 4: rows 0, 5, then 1, 3.
    expected = {0.3: [0, 5], 0.5: [0, 1, 3, 5]}[keep_ratio]
    assert list(np.flatnonzero(keep)) == expected
    check_case(
        _with_where(losses.hard_mining_loss, keep_ratio=keep_ratio),
        _with_where(ref.hard_mining_loss, keep_ratio=keep_ratio),
        logits,
        labels,
        where,
        scale=1.0,
    )


def test_hard_mining_mask_matches_reference():
    per_example = np.array([0.3, 2.0, 0.3, 5.0, 0.3, 1.0, 7.0, 0.3], np.float32)
    where = np.array([1, 1, 1, 1, 1, 1, 0, 1], bool)  # n = 7
    for keep_ratio in (0.2, 0.5, 0.75, 1.0):
        got = jax.jit(
            lambda x, r=keep_ratio: masks.hard_mining_mask(x, keep_ratio=r, where=where)
        )(jnp.asarray(per_example))
        want = ref.hard_mining_mask(per_example, keep_ratio=keep_ratio, where=where)
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=str(keep_ratio))
    got = masks.hard_mining_mask(jnp.asarray(per_example), keep_ratio=0.5)
    want = ref.hard_mining_mask(per_example, keep_ratio=0.5)
    np.testing.assert_array_equal(np.asarray(got), want)


# ---------------------------------------------------------------------------
# AdaCos scale.


@pytest.mark.parametrize("n_valid", [7, 8])
@pytest.mark.parametrize("use_where", [False, True])
@pytest.mark.parametrize("target_range", [(0.2, 0.95), (0.6, 0.99)])
def test_adacos_dynamic_scale_matches_reference(n_valid, use_where, target_range):
    rng = np.random.default_rng(n_valid)
    b = n_valid + (3 if use_where else 0)
    cos = rng.uniform(-0.3, 0.3, size=(b, 10)).astype(np.float32)
    labels = rng.integers(0, 10, size=b).astype(np.int32)
    # Distinct target angles; with (0.6, 0.99) the median is below π/4, so
    # which order statistic is taken matters (odd and even n).
    cy = rng.permutation(np.linspace(*target_range, b)).astype(np.float32)
    cos[np.arange(b), labels] = cy
    where = (np.arange(b) < n_valid) if use_where else None
    if use_where:
        cos[n_valid:] = 0.99  # padded garbage must not enter B_avg or the median
    run = jax.jit(
        lambda c, prev: adaptive.adacos_dynamic_scale(c, labels, prev, where=where)
    )
    for prev in (ref.adacos_fixed_scale(10), 30.0):
        got = run(jnp.asarray(cos), jnp.float32(prev))
        want = ref.adacos_dynamic_scale(
            cos.astype(np.float64), labels, prev, where=where
        )
        np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_adacos_fixed_scale():
    for n in (3, 10, 1000, 85742):
        np.testing.assert_allclose(
            float(adaptive.adacos_fixed_scale(n)), ref.adacos_fixed_scale(n), rtol=1e-6
        )


# ---------------------------------------------------------------------------
# Elementwise stage functions.


def _cos_line(kinks: Sequence[float] = ()) -> np.ndarray:
    c = np.concatenate(
        [
            np.linspace(-1.0, 1.0, 241),
            [-1.0 + 1e-6, -0.99999, 0.99999, 1.0 - 1e-6, np.nextafter(1, 0)],
        ]
    ).astype(np.float32)
    keep = np.ones(c.shape, bool)
    for k in kinks:
        keep &= np.abs(c.astype(np.float64) - k) > 1e-4
    return c[keep]


TARGETS = [
    ("normface", margins.normface_target, ref.normface_target, {}, ()),
    ("cosface", margins.cosface_target, ref.cosface_target, {"margin": 0.35}, ()),
    ("arcface", margins.arcface_target, ref.arcface_target, {"margin": 0.5}, ()),
    (
        "arcface_easy",
        margins.arcface_target,
        ref.arcface_target,
        {"margin": 0.5, "easy_margin": True},
        (0.0,),
    ),
    (
        "combined_1.5",
        margins.combined_target,
        ref.combined_target,
        {"m1": 1.5, "m2": 0.3, "m3": 0.2},
        (),
    ),
    (
        "combined_2",
        margins.combined_target,
        ref.combined_target,
        {"m1": 2, "m2": 0.3, "m3": 0.2},
        (),
    ),
    (
        "combined_4",
        margins.combined_target,
        ref.combined_target,
        {"m1": 4, "m2": 0.0, "m3": 0.0},
        (),
    ),
    *[
        (
            f"sphereface_psi_{m}",
            margins.sphereface_psi,
            ref.sphereface_psi,
            {"margin": m},
            (),
        )
        for m in (1, 2, 3, 4, 5, 6)
    ],
    (
        "sphereface_target",
        margins.sphereface_target,
        ref.sphereface_target,
        {"margin": 4, "lambda_": 5.0},
        (),
    ),
    ("eqm_target", margins.eqm_target, ref.eqm_target, {"t1": 0.45}, (0.45,)),
]


@pytest.mark.parametrize(
    "name,impl,want,kw,kinks", TARGETS, ids=[t[0] for t in TARGETS]
)
def test_target_transform_matches_reference(name, impl, want, kw, kinks):
    del name
    # Branch switches: the value jumps there, compare away from them.
    switch = []
    if "margin" in kw and impl is margins.arcface_target and not kw.get("easy_margin"):
        switch.append(-math.cos(kw["margin"]))
    if impl is margins.combined_target:
        a = (PI - kw["m2"]) / kw["m1"]
        if a < PI:
            switch.append(math.cos(a))
    c = _cos_line((*kinks, *switch))
    fn = functools.partial(impl, **kw)
    value = np.asarray(jax.jit(fn)(jnp.asarray(c)))
    deriv = np.asarray(jax.jit(jax.vmap(jax.grad(fn)))(jnp.asarray(c)))
    assert value.dtype == np.float32
    want_v = np.array([want(float(x), **kw)[0] for x in c])
    want_d = np.array([want(float(x), **kw)[1] for x in c])
    np.testing.assert_allclose(value, want_v, rtol=1e-5, atol=2e-6)
    assert np.all(np.isfinite(deriv)), c[~np.isfinite(deriv)]
    defined = ~np.isnan(want_d)
    np.testing.assert_allclose(deriv[defined], want_d[defined], rtol=2e-4, atol=1e-5)


def test_straight_through_target():
    fn = margins.straight_through(functools.partial(margins.arcface_target, margin=0.5))
    c = _cos_line((-math.cos(0.5),))
    value = np.asarray(jax.jit(fn)(jnp.asarray(c)))
    deriv = np.asarray(jax.vmap(jax.grad(fn))(jnp.asarray(c)))
    want = np.array([ref.arcface_target(float(x))[0] for x in c])
    np.testing.assert_allclose(value, want, rtol=1e-5, atol=2e-6)
    np.testing.assert_array_equal(deriv, 1.0)


def test_sphereface_lambda_matches_reference():
    for step in (0, 1, 10, 100, 1000, 10_000, 1_000_000):
        for kw in ({}, {"base": 1500.0, "gamma": 0.2, "power": 2.0, "lambda_min": 3.0}):
            got = float(margins.sphereface_lambda(step, **kw))
            np.testing.assert_allclose(
                got, ref.sphereface_lambda(step, **kw), rtol=1e-5, err_msg=str(kw)
            )


NON_TARGETS = [
    ("sv", masks.sv_non_target, ref.sv_non_target, {"t": 1.2}),
    ("mv_fixed", masks.mv_non_target, ref.mv_non_target, {"t": 0.2, "mode": "fixed"}),
    (
        "mv_adaptive",
        masks.mv_non_target,
        ref.mv_non_target,
        {"t": 0.2, "mode": "adaptive"},
    ),
    ("curricular", masks.curricular_non_target, ref.curricular_non_target, {"t": 0.3}),
    ("eqm", masks.eqm_non_target, ref.eqm_non_target, {"t2": 0.25}),
]


@pytest.mark.parametrize(
    "name,impl,want,kw", NON_TARGETS, ids=[t[0] for t in NON_TARGETS]
)
def test_non_target_transform_matches_reference(name, impl, want, kw):
    rng = np.random.default_rng(11)
    cos = rng.uniform(-1, 1, size=(9, 7)).astype(np.float32)
    cos[0, :2] = [1.0, -1.0]
    target = rng.uniform(-1.2, 1.0, size=(9, 1)).astype(np.float32)
    kinks = lambda t: (t, kw.get("t2", t))  # noqa: E731
    for i in range(cos.shape[0]):
        for k in range(cos.shape[1]):
            cos[i, k] = _nudge_away(cos[i, k], kinks(float(target[i, 0])), 1e-3)
    fn = functools.partial(impl, **kw)
    value, vjp = jax.vjp(fn, jnp.asarray(cos), jnp.asarray(target))
    dcos, dtarget = vjp(jnp.ones(cos.shape, jnp.float32))
    want_v = np.zeros(cos.shape)
    want_d = np.zeros(cos.shape)
    for i in range(cos.shape[0]):
        for k in range(cos.shape[1]):
            want_v[i, k], want_d[i, k] = want(
                float(cos[i, k]), float(target[i, 0]), **kw
            )
    np.testing.assert_allclose(np.asarray(value), want_v, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(dcos), want_d, rtol=1e-6, atol=1e-7)
    # The mask is built from a comparison: no gradient reaches the target.
    np.testing.assert_array_equal(np.asarray(dtarget), 0.0)


def test_support_vector_mask_matches_reference():
    rng = np.random.default_rng(12)
    cos = rng.uniform(-1, 1, size=(8, 6)).astype(np.float32)
    labels = rng.integers(0, 6, size=8).astype(np.int32)
    target = rng.uniform(-1, 1, size=8).astype(np.float32)
    target[0] = -1.5  # every non-target is a support vector, never the label
    cos[1, (labels[1] + 1) % 6] = target[1]  # strict: a tie is not a support vector
    got = masks.support_vector_mask(jnp.asarray(cos), labels, jnp.asarray(target))
    want = ref.support_vector_mask(cos, labels, target)
    np.testing.assert_array_equal(np.asarray(got), want)


# ---------------------------------------------------------------------------
# Cosine logits and gradients w.r.t. embeddings and class weights.


def test_cosine_logits_and_target_columns():
    rng = np.random.default_rng(13)
    x = rng.normal(size=(5, 8)).astype(np.float32)
    w = rng.normal(size=(7, 8)).astype(np.float32)
    w[3] = 4.0 * x[1]  # c = 1 up to rounding: must be clipped
    got = np.asarray(cosine.cosine_logits(jnp.asarray(x), jnp.asarray(w)))
    want = ref.cosine_logits(x, w)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got.max() <= 1.0 and got.min() >= -1.0
    np.testing.assert_allclose(
        np.asarray(cosine.l2_normalize(jnp.asarray(x))), ref.l2_normalize(x), atol=1e-6
    )
    labels = rng.integers(0, 7, size=5).astype(np.int32)
    taken = np.asarray(cosine.take_target(jnp.asarray(got), labels))
    np.testing.assert_array_equal(taken, got[np.arange(5), labels])
    values = rng.normal(size=5).astype(np.float32)
    put = np.asarray(cosine.put_target(jnp.asarray(got), labels, jnp.asarray(values)))
    expected = got.copy()
    expected[np.arange(5), labels] = values
    np.testing.assert_array_equal(put, expected)


EMBEDDING_CASES = [
    ("normface", lambda c, y: losses.normface_loss(c, y), ref.normface_loss),
    ("cosface", lambda c, y: losses.cosface_loss(c, y), ref.cosface_loss),
    ("arcface", lambda c, y: losses.arcface_loss(c, y), ref.arcface_loss),
    (
        "combined_1.5",
        lambda c, y: losses.combined_margin_loss(c, y, m1=1.5),
        lambda c, y: ref.combined_margin_loss(c, y, m1=1.5),
    ),
    (
        "sv_arcface",
        lambda c, y: losses.sv_softmax_loss(c, y, margin_type="arcface", margin=0.5),
        lambda c, y: ref.sv_softmax_loss(c, y, margin_type="arcface", margin=0.5),
    ),
    (
        "mv_adaptive",
        lambda c, y: losses.mv_softmax_loss(c, y),
        lambda c, y: ref.mv_softmax_loss(c, y),
    ),
    (
        "eqm",
        lambda c, y: losses.eqm_loss(c, y, scale=64.0, t1=0.4, t2=0.05),
        lambda c, y: ref.eqm_loss(c, y, scale=64.0, t1=0.4, t2=0.05),
    ),
    (
        "curricular",
        lambda c, y: losses.curricularface_loss(
            c, y, adaptive.CurricularState(t=jnp.float32(0.2))
        )[0],
        lambda c, y: ref.curricularface_loss(c, y, 0.2)[:2],
    ),
    (
        "sphereface4_normalised",
        lambda c, y: losses.sphereface_loss(c, y, margin=4, lambda_=5.0, scale=16.0),
        lambda c, y: ref.sphereface_loss(c, y, margin=4, lambda_=5.0, scale=16.0),
    ),
]


def _embedding_data():
    rng = np.random.default_rng(21)
    b, d, n_cls = 6, 8, 7
    w = rng.normal(size=(n_cls, d))
    labels = rng.integers(0, n_cls, size=b).astype(np.int32)
    # Pull each embedding towards its class so target angles span (0, π).
    pull = np.linspace(2.5, -1.5, b)[:, None]
    x = pull * w[labels] / np.linalg.norm(w[labels], axis=1, keepdims=True)
    x = x + rng.normal(size=(b, d))
    x *= rng.uniform(0.5, 3.0, size=(b, 1))
    return x.astype(np.float32), w.astype(np.float32), labels


@pytest.mark.parametrize(
    "name,impl,want", EMBEDDING_CASES, ids=[c[0] for c in EMBEDDING_CASES]
)
def test_embedding_and_weight_gradients(name, impl, want):
    x, w, labels = _embedding_data()
    v = _weights(len(labels))

    @jax.jit
    def run(x, w):
        fn = lambda x_, w_: impl(cosine.cosine_logits(x_, w_), labels)  # noqa: E731
        loss, vjp = jax.vjp(fn, x, w)
        return (loss, *vjp(v))

    loss, dx, dw = run(jnp.asarray(x), jnp.asarray(w))
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    cos64 = ref.cosine_logits(x64, w64)
    want_loss, want_dcos = want(cos64, labels)[:2]
    want_dx, want_dw = ref.cosine_logits_backward(x64, w64, v[:, None] * want_dcos)
    # float32 cos differs from float64 by ~1e-7; the losses amplify that by s.
    np.testing.assert_allclose(np.asarray(loss), want_loss, rtol=1e-4, atol=1e-4)
    for got, exp in ((dx, want_dx), (dw, want_dw)):
        got = np.asarray(got)
        np.testing.assert_allclose(got, exp, rtol=1e-3, atol=1e-4 * np.abs(exp).max())


def test_sphereface_original_gradients_through_feature_norm():
    """Original SphereFace: logits scaled by ||x_i||, gradient through the norm."""
    x, w, labels = _embedding_data()
    v = _weights(len(labels))

    def fn(x_, w_):
        norms = jnp.linalg.norm(x_, axis=-1)
        cos = cosine.cosine_logits(x_, w_)
        return losses.sphereface_loss(
            cos, labels, margin=4, lambda_=5.0, feature_norm=norms
        )

    @jax.jit
    def run(x, w):
        loss, vjp = jax.vjp(fn, x, w)
        return (loss, *vjp(v))

    loss, dx, dw = run(jnp.asarray(x), jnp.asarray(w))
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    norms = np.linalg.norm(x64, axis=-1)
    cos64 = ref.cosine_logits(x64, w64)
    want_loss, want_dcos, want_dnorm = ref.sphereface_loss(
        cos64, labels, margin=4, lambda_=5.0, feature_norm=norms
    )
    want_dx, want_dw = ref.cosine_logits_backward(x64, w64, v[:, None] * want_dcos)
    want_dx += (v * want_dnorm)[:, None] * ref.l2_normalize(x64)
    np.testing.assert_allclose(np.asarray(loss), want_loss, rtol=1e-4, atol=1e-4)
    for got, exp in ((dx, want_dx), (dw, want_dw)):
        got = np.asarray(got)
        np.testing.assert_allclose(got, exp, rtol=1e-3, atol=1e-4 * np.abs(exp).max())


# ---------------------------------------------------------------------------
# where=None agrees with the reference on the full batch.


@pytest.mark.parametrize(
    "name,impl,want",
    [
        ("arcface", lambda c, y: losses.arcface_loss(c, y), ref.arcface_loss),
        (
            "sv",
            lambda c, y: losses.sv_softmax_loss(c, y),
            lambda c, y: ref.sv_softmax_loss(c, y),
        ),
        (
            "hard_mining",
            lambda z, y: losses.hard_mining_loss(z, y, keep_ratio=0.5),
            lambda z, y: ref.hard_mining_loss(z, y, keep_ratio=0.5),
        ),
    ],
    ids=["arcface", "sv", "hard_mining"],
)
def test_without_where(name, impl, want):
    cos, labels, where = make_cos_batch(
        boundaries=(PI - 0.5,), target_value=_val(ref.arcface_target), seed=5
    )
    cos, labels = cos[where], labels[where]
    all_valid = np.ones(len(labels), bool)
    check_case(
        lambda c, y, w: impl(c, y),
        lambda c, y, w: want(c, y),
        cos,
        labels,
        all_valid,
        scale=64.0,
    )


# ---------------------------------------------------------------------------
# The reference against itself: analytic gradients vs central differences, and
# the identities of docs/losses.md. These do not touch the implementation.


REF_GRAD_CASES = [
    ("arcface", functools.partial(ref.arcface_loss, scale=8.0)),
    ("combined_1.5", functools.partial(ref.combined_margin_loss, scale=8.0, m1=1.5)),
    ("combined_3", functools.partial(ref.combined_margin_loss, scale=8.0, m1=3)),
    ("sphereface_5", functools.partial(ref.sphereface_loss, scale=4.0, margin=5)),
    (
        "sphereface_orig",
        lambda c, y: ref.sphereface_loss(
            c, y, margin=3, lambda_=5.0, feature_norm=np.linspace(1, 5, len(y))
        ),
    ),
    ("sv_arc", functools.partial(ref.sv_softmax_loss, margin_type="arcface", t=1.3)),
    ("mv", functools.partial(ref.mv_softmax_loss, scale=8.0, t=0.3)),
    ("eqm", functools.partial(ref.eqm_loss, scale=8.0, t1=0.5, t2=0.1)),
    (
        "curricular_fixed_t",
        functools.partial(
            ref.margin_softmax_loss,
            target_fn=ref.arcface_target,
            non_target_fn=functools.partial(ref.curricular_non_target, t=0.3),
            scale=8.0,
        ),
    ),
]


@pytest.mark.parametrize("name,fn", REF_GRAD_CASES, ids=[c[0] for c in REF_GRAD_CASES])
def test_reference_gradient_matches_finite_differences(name, fn):
    del name
    rng = np.random.default_rng(0)
    b = 6
    labels = rng.integers(0, 5, size=b)
    cos = rng.uniform(-0.95, 0.95, size=(b, 5))
    _, grad = fn(cos, labels)[:2]
    h = 1e-6
    for i in range(b):
        for j in range(5):
            plus, minus = cos.copy(), cos.copy()
            plus[i, j] += h
            minus[i, j] -= h
            fd = (fn(plus, labels)[0][i] - fn(minus, labels)[0][i]) / (2 * h)
            np.testing.assert_allclose(grad[i, j], fd, rtol=1e-5, atol=1e-6)


def test_reference_identities():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, size=8)
    cos = rng.uniform(-1, 1, size=(8, 5))
    cos[0, labels[0]] = -0.95  # beyond π - m for m = 0.5

    def same(a, b):
        np.testing.assert_allclose(a[0], b[0], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(a[1], b[1], rtol=1e-12, atol=1e-12)

    base = ref.normface_loss(cos, labels)
    same(ref.cosface_loss(cos, labels, margin=0.0), base)
    same(ref.arcface_loss(cos, labels, margin=0.0), base)
    same(ref.combined_margin_loss(cos, labels, m1=1.0, m2=0.0, m3=0.0), base)
    same(ref.sphereface_loss(cos, labels, margin=1), base)
    same(
        ref.combined_margin_loss(cos, labels, m1=1.0, m2=0.5, m3=0.0),
        ref.arcface_loss(cos, labels, margin=0.5),
    )
    same(
        ref.combined_margin_loss(cos, labels, m1=1.0, m2=0.0, m3=0.35),
        ref.cosface_loss(cos, labels, margin=0.35),
    )
    for margin_type, margin in [("none", 0.0), ("cosface", 0.35), ("arcface", 0.5)]:
        base = {
            "none": ref.normface_loss(cos, labels, scale=32.0),
            "cosface": ref.cosface_loss(cos, labels, scale=32.0, margin=0.35),
            "arcface": ref.arcface_loss(cos, labels, scale=32.0, margin=0.5),
        }[margin_type]
        same(
            ref.sv_softmax_loss(
                cos, labels, t=1.0, margin_type=margin_type, margin=margin
            ),
            base,
        )
        for mode in ("fixed", "adaptive"):
            same(
                ref.mv_softmax_loss(
                    cos,
                    labels,
                    t=0.0,
                    margin_type=margin_type,
                    margin=margin,
                    mode=mode,
                ),
                base,
            )
    # EqM written directly == its margin-softmax composition; with both hinges
    # active it is CosFace with m = t1 - t2 (here every c_j > t2 = -1).
    eqm = ref.eqm_loss(cos, labels, scale=16.0, t1=0.6, t2=-0.2)
    composed = ref.margin_softmax_loss(
        cos,
        labels,
        target_fn=functools.partial(ref.eqm_target, t1=0.6),
        non_target_fn=functools.partial(ref.eqm_non_target, t2=-0.2),
        scale=16.0,
    )
    np.testing.assert_allclose(eqm[0], composed[0], rtol=1e-12)
    np.testing.assert_allclose(eqm[1], composed[1], rtol=1e-12, atol=1e-12)
    eqm_all = ref.eqm_loss(cos, labels, scale=16.0, t1=1.5, t2=-1.5)
    cosface = ref.cosface_loss(cos, labels, scale=16.0, margin=3.0)
    np.testing.assert_allclose(eqm_all[0], cosface[0], rtol=1e-12)
    np.testing.assert_allclose(eqm_all[1], cosface[1], rtol=1e-12, atol=1e-12)
    # Combined fallback is monotone and continuous at the switch.
    for m1, m2 in [(1.0, 0.5), (2.0, 0.3), (1.5, 0.3), (4.0, 0.0)]:
        a = (PI - m2) / m1
        if a >= PI:
            continue
        below = ref.combined_target(math.cos(a - 1e-9), m1=m1, m2=m2, m3=0.0)[0]
        above = ref.combined_target(math.cos(a + 1e-9), m1=m1, m2=m2, m3=0.0)[0]
        assert above <= below + 1e-6
        cs = np.linspace(-1, 1, 2001)
        vals = [ref.combined_target(float(c), m1=m1, m2=m2, m3=0.0)[0] for c in cs]
        assert np.all(np.diff(vals) >= -1e-12)
    # SphereFace ψ is continuous and decreasing in θ.
    for m in (2, 3, 4, 5):
        th = np.linspace(0, PI, 3001)
        psi = [ref.sphereface_psi(math.cos(t), margin=m)[0] for t in th]
        assert np.all(np.diff(psi) <= 1e-9)
