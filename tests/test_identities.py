"""The identities of docs/losses.md (margin-softmax pipeline), to 1e-6 relative
in float32."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import margin_jax as mj
from tests.helpers import GRID_ANGLES, grid_inputs, random_inputs

RTOL = 1e-6


def close(a, b, rtol=RTOL, atol=0.0):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "loss",
    [
        functools.partial(mj.cosface_loss, margin=0.0),
        functools.partial(mj.arcface_loss, margin=0.0),
        functools.partial(mj.combined_margin_loss, m1=1.0, m2=0.0, m3=0.0),
        functools.partial(mj.sv_softmax_loss, scale=64.0, t=1.0),
        functools.partial(mj.mv_softmax_loss, scale=64.0, t=0.0, margin=0.0),
        functools.partial(mj.sphereface_loss, margin=1, scale=64.0),
    ],
    ids=["cosface", "arcface", "combined", "sv_t1", "mv_t0", "sphereface_m1"],
)
def test_zero_margin_is_normface(loss):
    cos, labels = grid_inputs()
    close(loss(cos, labels), mj.normface_loss(cos, labels, scale=64.0), atol=1e-5)


@pytest.mark.parametrize("m", [0.2, 0.5, 0.8])
def test_combined_1_m_0_is_arcface(m):
    cos, labels = grid_inputs()
    a = mj.combined_margin_loss(cos, labels, m1=1.0, m2=m, m3=0.0)
    b = mj.arcface_loss(cos, labels, margin=m)
    close(a, b)
    ga = jax.grad(lambda c: mj.combined_margin_loss(c, labels, m1=1, m2=m, m3=0).sum())
    gb = jax.grad(lambda c: mj.arcface_loss(c, labels, margin=m).sum())
    close(ga(cos), gb(cos), atol=1e-6)


@pytest.mark.parametrize("m", [0.2, 0.35])
def test_combined_1_0_m_is_cosface(m):
    cos, labels = grid_inputs()
    close(
        mj.combined_margin_loss(cos, labels, m1=1.0, m2=0.0, m3=m),
        mj.cosface_loss(cos, labels, margin=m),
    )


def test_combined_traced_m1_matches_chebyshev_form():
    # An integral m1 uses Chebyshev polynomials; a traced one uses arccos.
    cos, labels = grid_inputs()
    for m1 in (1.0, 2.0, 3.0):
        static = mj.combined_target(cos, m1=m1, m2=0.2, m3=0.1)
        traced = jax.jit(lambda c, m: mj.combined_target(c, m1=m, m2=0.2, m3=0.1))(
            cos, m1
        )
        close(static, traced, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    "margin_type,margin", [("none", 0.0), ("cosface", 0.35), ("arcface", 0.5)]
)
def test_sv_with_t1_is_base_loss(margin_type, margin):
    cos, labels = grid_inputs()
    base = mj.margin_softmax_loss(
        cos,
        labels,
        target_fn=mj.losses.margin_target_fn(margin_type, margin, fn="t"),
        scale=32.0,
    )
    sv = mj.sv_softmax_loss(cos, labels, t=1.0, margin_type=margin_type, margin=margin)
    close(sv, base)


@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
@pytest.mark.parametrize("margin_type", ["cosface", "arcface"])
def test_mv_with_t0_is_base_loss(mode, margin_type):
    cos, labels = grid_inputs()
    mv = mj.mv_softmax_loss(cos, labels, t=0.0, margin_type=margin_type, mode=mode)
    ref = (mj.cosface_loss if margin_type == "cosface" else mj.arcface_loss)(
        cos, labels, scale=32.0, margin=0.35
    )
    close(mv, ref)


def test_mv_adaptive_is_sv_with_t_plus_one():
    cos, labels = grid_inputs()
    close(
        mj.mv_softmax_loss(cos, labels, t=0.2, mode="adaptive"),
        mj.sv_softmax_loss(cos, labels, t=1.2, margin_type="cosface", margin=0.35),
    )


def test_sv_reweights_support_vectors_by_h():
    # e^{s(t c + t - 1)} = e^{s c} · exp(s (t - 1)(c + 1)) for support vectors.
    cos, labels = random_inputs(batch=4, num_classes=6, seed=3)
    s, t = 32.0, 1.2
    f = cos[jnp.arange(4), labels] - 0.35
    mask = np.asarray(mj.support_vector_mask(cos, labels, f))
    c64, f64 = np.asarray(cos, np.float64), np.asarray(f, np.float64)
    h = np.where(mask, np.exp(s * (t - 1) * (c64 + 1)), 1.0)
    terms = np.exp(s * c64) * h
    terms[np.arange(4), labels] = np.exp(s * f64)
    expected = np.log(terms.sum(-1)) - s * f64
    got = mj.sv_softmax_loss(cos, labels, t=t, margin_type="cosface", margin=0.35)
    close(got, expected, rtol=1e-5)
    assert bool(mask.any()), "test batch must contain support vectors"


PRESETS = {
    "normface": (mj.normface_loss, dict(target_fn=mj.normface_target, scale=64.0)),
    "cosface": (
        functools.partial(mj.cosface_loss, scale=30.0, margin=0.4),
        dict(target_fn=functools.partial(mj.cosface_target, margin=0.4), scale=30.0),
    ),
    "arcface": (
        mj.arcface_loss,
        dict(target_fn=functools.partial(mj.arcface_target, margin=0.5), scale=64.0),
    ),
    "arcface_st": (
        functools.partial(mj.arcface_loss, straight_through=True),
        dict(
            target_fn=mj.straight_through(
                functools.partial(mj.arcface_target, margin=0.5)
            ),
            scale=64.0,
        ),
    ),
    "combined": (
        mj.combined_margin_loss,
        dict(
            target_fn=functools.partial(mj.combined_target, m1=1.0, m2=0.3, m3=0.2),
            scale=64.0,
        ),
    ),
    "sphereface": (
        functools.partial(mj.sphereface_loss, margin=3, lambda_=2.0, scale=16.0),
        dict(
            target_fn=functools.partial(mj.sphereface_target, margin=3, lambda_=2.0),
            scale=16.0,
        ),
    ),
    "sv_arc": (
        functools.partial(mj.sv_softmax_loss, margin_type="arcface", margin=0.5),
        dict(
            target_fn=functools.partial(mj.arcface_target, margin=0.5),
            non_target_fn=functools.partial(mj.sv_non_target, t=1.2),
            scale=32.0,
        ),
    ),
    "mv_am": (
        mj.mv_softmax_loss,
        dict(
            target_fn=functools.partial(mj.cosface_target, margin=0.35),
            non_target_fn=functools.partial(mj.mv_non_target, t=0.2, mode="adaptive"),
            scale=32.0,
        ),
    ),
    "eqm": (
        functools.partial(mj.eqm_loss, scale=64.0, t1=0.6, t2=0.25),
        dict(
            target_fn=functools.partial(mj.eqm_target, t1=0.6),
            non_target_fn=functools.partial(mj.eqm_non_target, t2=0.25),
            scale=64.0,
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_is_explicit_combination(name):
    preset, kwargs = PRESETS[name]
    cos, labels = grid_inputs()
    close(preset(cos, labels), mj.margin_softmax_loss(cos, labels, **kwargs))
    g1 = jax.grad(lambda c: preset(c, labels).sum())(cos)
    g2 = jax.grad(lambda c: mj.margin_softmax_loss(c, labels, **kwargs).sum())(cos)
    close(g1, g2)


def test_margin_softmax_is_softmax_of_margin_logits():
    cos, labels = grid_inputs()
    kw = dict(target_fn=functools.partial(mj.arcface_target, margin=0.5), scale=64.0)
    close(
        mj.margin_softmax_loss(cos, labels, **kw),
        mj.softmax_loss(mj.margin_logits(cos, labels, **kw), labels),
        atol=2e-5,
    )


def test_eqm_with_both_hinges_active_is_cosface():
    # c_y < t1 and every c_j > t2: EqM == CosFace with m = t1 - t2.
    rng = np.random.default_rng(0)
    cos = rng.uniform(0.3, 0.55, (5, 6)).astype(np.float32)
    labels = jnp.array([0, 1, 2, 3, 4])
    cos[np.arange(5), labels] = rng.uniform(-0.5, 0.5, 5)
    t1, t2 = 0.6, 0.25
    close(
        mj.eqm_loss(cos, labels, scale=64.0, t1=t1, t2=t2),
        mj.cosface_loss(cos, labels, scale=64.0, margin=t1 - t2),
        rtol=1e-5,
    )


def test_eqm_gradients_switch_off():
    cos = jnp.array([[0.9, 0.1, 0.5], [0.2, 0.4, 0.0]])
    labels = jnp.array([0, 1])
    g = jax.grad(lambda c: mj.eqm_loss(c, labels, scale=16.0, t1=0.6, t2=0.25).sum())(
        cos
    )
    assert g[0, 0] == 0.0  # c_y >= t1
    assert g[0, 1] == 0.0 and g[1, 2] == 0.0  # c_j <= t2
    assert g[1, 1] < 0 and g[0, 2] > 0  # active hinges


def test_straight_through_gradient_is_normface_gradient():
    cos, labels = grid_inputs()
    g_st = jax.grad(lambda c: mj.arcface_loss(c, labels, straight_through=True).sum())
    logits = mj.margin_logits(
        cos,
        labels,
        target_fn=functools.partial(mj.arcface_target, margin=0.5),
        scale=64.0,
    )
    # d/dc of CE(s·z) with dz_y/dc_y = 1: s·(softmax - onehot).
    expected = 64.0 * (jax.nn.softmax(logits) - jax.nn.one_hot(labels, cos.shape[1]))
    close(g_st(cos), expected, atol=1e-4)


def test_focal_gamma0_and_hard_mining_ratio1_are_softmax():
    cos, labels = random_inputs(seed=4)
    logits = 10.0 * cos
    close(mj.focal_loss(logits, labels, gamma=0.0), mj.softmax_loss(logits, labels))
    close(
        mj.hard_mining_loss(logits, labels, keep_ratio=1.0),
        mj.softmax_loss(logits, labels),
    )


def test_naive_mining_margin_is_a_composition():
    cos, labels = random_inputs(seed=5)
    kw = dict(target_fn=functools.partial(mj.cosface_target, margin=0.35), scale=30.0)
    logits = mj.margin_logits(cos, labels, **kw)
    ce = mj.margin_softmax_loss(cos, labels, **kw)
    close(
        mj.focal_loss(logits, labels), mj.focal_weight(logits, labels) * ce, rtol=1e-5
    )
    keep = mj.hard_mining_mask(ce, keep_ratio=0.5)
    close(
        mj.hard_mining_loss(logits, labels, keep_ratio=0.5),
        jnp.where(keep, ce, 0.0),
        rtol=1e-5,
    )


def test_hard_mining_keeps_floor_rB_largest():
    ce = jnp.array([0.5, 2.0, 2.0, 0.1, 3.0, 1.0, 0.7])
    keep = mj.hard_mining_mask(ce, keep_ratio=0.5)  # floor(3.5) = 3
    assert keep.tolist() == [False, True, True, False, True, False, False]
    keep = mj.hard_mining_mask(ce, keep_ratio=0.3)  # 2; tie at 2.0 -> earlier first
    assert keep.tolist() == [False, True, False, False, True, False, False]
    where = jnp.array([True, True, False, True, True, True, True])
    keep = mj.hard_mining_mask(ce, keep_ratio=0.5, where=where)  # floor(3) = 3
    assert keep.tolist() == [False, True, False, False, True, True, False]


def test_chebyshev_matches_explicit_polynomials_and_cos_m_theta():
    c = jnp.linspace(-1.0, 1.0, 41)
    close(mj.chebyshev_cos(c, 2), 2 * c**2 - 1, atol=1e-6)
    close(mj.chebyshev_cos(c, 3), 4 * c**3 - 3 * c, atol=1e-6)
    close(mj.chebyshev_cos(c, 4), 8 * c**4 - 8 * c**2 + 1, atol=1e-6)
    theta = np.arccos(np.asarray(c, np.float64))
    for m in range(0, 8):
        close(mj.chebyshev_cos(c, m), np.cos(m * theta), atol=5e-5)
        close(mj.chebyshev_sin(c, m), np.sin(m * theta), atol=5e-5)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
def test_sphereface_psi_is_monotone_and_continuous(m):
    theta = np.linspace(0, np.pi, 2001)
    psi = np.asarray(
        mj.sphereface_psi(jnp.asarray(np.cos(theta), jnp.float32), margin=m)
    )
    assert np.all(np.diff(psi) <= 1e-5)
    assert np.max(np.abs(np.diff(psi))) < 0.05  # no jumps
    close(psi[[0, -1]], [1.0, 1.0 - 2 * m], atol=1e-5)


def test_arcface_target_is_monotone():
    theta = np.linspace(0, np.pi, 2001)
    f = np.asarray(mj.arcface_target(jnp.asarray(np.cos(theta), jnp.float32)))
    assert np.all(np.diff(f) <= 1e-6)
    # Fallback region θ > π - m uses c - m·sin m.
    close(
        f[theta > np.pi - 0.5],
        np.cos(theta[theta > np.pi - 0.5]) - 0.5 * np.sin(0.5),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "m1,m2,m3", [(1.0, 0.5, 0.0), (2.0, 0.0, 0.1), (1.5, 0.3, 0.2), (3.0, 0.2, 0.0)]
)
def test_combined_target_is_monotone(m1, m2, m3):
    theta = np.linspace(0, np.pi, 2001)
    f = np.asarray(
        mj.combined_target(jnp.asarray(np.cos(theta), jnp.float32), m1=m1, m2=m2, m3=m3)
    )
    assert np.all(np.diff(f) <= 1e-5)


def test_sphereface_lambda_schedule():
    assert float(mj.sphereface_lambda(0)) == 1000.0
    np.testing.assert_allclose(
        float(mj.sphereface_lambda(100)), 1000.0 / 13.0, rtol=1e-6
    )
    assert float(mj.sphereface_lambda(1_000_000)) == 5.0
    lam = jax.jit(mj.sphereface_lambda)(jnp.arange(0, 5000, 500))
    assert np.all(np.diff(np.asarray(lam)) <= 0)


def test_sphereface_large_lambda_tends_to_normface():
    cos, labels = random_inputs(seed=6)
    close(
        mj.sphereface_loss(cos, labels, lambda_=1e7, scale=16.0),
        mj.normface_loss(cos, labels, scale=16.0),
        rtol=1e-4,
    )


def test_sphereface_original_form_uses_feature_norm():
    x = jnp.array([[3.0, 4.0], [0.0, -2.0]])
    w = jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]])
    labels = jnp.array([1, 2])
    cos = mj.cosine_logits(x, w)
    norms = jnp.linalg.norm(x, axis=-1)
    got = mj.sphereface_loss(cos, labels, margin=1, feature_norm=norms)
    # With m = 1, λ = 0 the logits are ||x||·c = x·ŵ.
    logits = x @ (w / jnp.linalg.norm(w, axis=-1, keepdims=True)).T
    close(got, mj.softmax_loss(logits, labels), rtol=1e-6)


def test_adacos_fixed_scale():
    close(mj.adacos_fixed_scale(10_001), np.sqrt(2) * np.log(10_000))


def test_grid_covers_the_branches():
    assert GRID_ANGLES[0] == 0.0 and GRID_ANGLES[-1] == np.pi
    assert np.any((GRID_ANGLES > np.pi - 0.5) & (GRID_ANGLES < np.pi - 0.45))
    assert np.any((GRID_ANGLES < np.pi - 0.5) & (GRID_ANGLES > np.pi - 0.55))
