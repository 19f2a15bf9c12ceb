"""Finite gradients at the edges, low precision, jit / vmap / where, check_grads."""

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import margin_jax as mj
from tests.helpers import LOSSES, grid_inputs, random_inputs

NAMES = sorted(LOSSES)


def _sum_loss(name):
    return lambda c, y: LOSSES[name](c, y).sum()


@pytest.mark.parametrize("name", NAMES)
def test_finite_gradients_at_cos_plus_minus_one(name):
    # Targets and non-targets exactly at ±1.
    cos = jnp.array(
        [
            [1.0, -1.0, 0.2, 1.0],
            [-1.0, 1.0, -1.0, 0.0],
            [1.0, 1.0, 1.0, 1.0],
            [-1.0, -1.0, -1.0, -1.0],
        ]
    )
    labels = jnp.array([0, 0, 2, 3])
    value, grad = jax.value_and_grad(_sum_loss(name))(cos, labels)
    assert np.isfinite(value)
    assert np.all(np.isfinite(grad)), grad


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_compute_in_float32(name, dtype):
    cos, labels = grid_inputs()
    low = cos.astype(dtype)
    loss = LOSSES[name](low, labels)
    assert loss.dtype == jnp.float32
    # Same as the float32 loss on the rounded inputs.
    np.testing.assert_allclose(
        loss, LOSSES[name](low.astype(jnp.float32), labels), rtol=1e-6, atol=1e-6
    )
    grad = jax.grad(_sum_loss(name))(low, labels)
    assert grad.dtype == dtype
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))


@pytest.mark.parametrize("name", ["arcface", "cosface", "sv_arc", "sphereface", "eqm"])
def test_embedding_norms_do_not_matter(name):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 16)).astype(np.float32)
    w = rng.normal(size=(7, 16)).astype(np.float32)
    labels = jnp.array([0, 3, 6, 2, 2])
    x_unit = x / np.linalg.norm(x, axis=-1, keepdims=True)

    def loss(x, w):
        return LOSSES[name](mj.cosine_logits(x, w), labels).sum()

    # One compilation per function for every norm (same shapes).
    value = jax.jit(loss)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))
    ref = value(x_unit, w)
    gx_unit = jax.grad(loss)(jnp.asarray(x_unit), w)
    for norm in (1e-30, 1e-8, 1.0, 1e8, 1e30):
        scaled = jnp.asarray(x_unit * norm, jnp.float32)
        np.testing.assert_allclose(value(scaled, w), ref, rtol=1e-5, err_msg=norm)
        # Class centres are normalised in one pass: norms 1e-12 to ~1e18 in f32.
        w_scale = float(np.clip(norm, 1e-10, 1e15))
        np.testing.assert_allclose(
            value(x_unit, w * w_scale), ref, rtol=1e-5, err_msg=norm
        )
        gx, gw = grads(scaled, w * w_scale)
        assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gw)), norm
        # d loss / dx scales as 1/||x||: compare against the unit-norm gradient.
        np.testing.assert_allclose(
            np.asarray(gx) * norm, gx_unit, rtol=2e-3, atol=1e-4, err_msg=norm
        )


def test_zero_embedding_has_finite_gradient():
    x = jnp.zeros((2, 4)).at[1].set(1.0)
    w = jnp.eye(4)
    g = jax.grad(
        lambda x: mj.arcface_loss(mj.cosine_logits(x, w), jnp.array([0, 1])).sum()
    )
    assert np.all(np.isfinite(g(x)))


@pytest.mark.parametrize("name", NAMES)
def test_jit_matches_eager(name):
    cos, labels = grid_inputs()
    np.testing.assert_allclose(
        jax.jit(LOSSES[name])(cos, labels),
        LOSSES[name](cos, labels),
        rtol=1e-5,
        atol=1e-6,
    )


# Losses without batch statistics are per-example: batch == vmap of single rows.
PER_EXAMPLE = [n for n in NAMES if n not in ("hard_mining", "curricularface")]


@pytest.mark.parametrize("name", PER_EXAMPLE)
def test_batch_equals_vmap_of_single_examples(name):
    cos, labels = grid_inputs()
    if name == "sphereface_orig":  # per-example feature norms travel with the row
        fn = lambda c, y, n: mj.sphereface_loss(c, y, feature_norm=n)  # noqa: E731
        norms = jnp.linspace(1.0, 9.0, cos.shape[0])
        single = jax.vmap(lambda c, y, n: fn(c[None], y[None], n[None])[0])
        np.testing.assert_allclose(
            single(cos, labels, norms), fn(cos, labels, norms), rtol=1e-6, atol=1e-6
        )
        return
    single = jax.vmap(lambda c, y: LOSSES[name](c[None], y[None])[0])
    np.testing.assert_allclose(
        single(cos, labels), LOSSES[name](cos, labels), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("name", NAMES)
def test_where_equals_slicing(name):
    cos, labels = grid_inputs()
    keep = np.ones(cos.shape[0], bool)
    keep[[1, 4, 9]] = False
    # Garbage in padded rows must not leak: NaN there.
    dirty = cos.at[~keep].set(jnp.nan)
    full = LOSSES[name](dirty, labels, where=jnp.asarray(keep))
    assert np.all(np.asarray(full)[~keep] == 0.0)
    if name == "sphereface_orig":  # its feature norms are tied to row positions
        norms = jnp.linspace(1.0, 9.0, cos.shape[0])
        sliced = mj.sphereface_loss(cos[keep], labels[keep], feature_norm=norms[keep])
    else:
        sliced = LOSSES[name](cos[keep], labels[keep])
    np.testing.assert_allclose(np.asarray(full)[keep], sliced, rtol=1e-6, atol=1e-6)
    grad = jax.grad(lambda c: LOSSES[name](c, labels, where=jnp.asarray(keep)).sum())(
        dirty
    )
    assert np.all(np.asarray(grad)[~keep] == 0.0)
    assert np.all(np.isfinite(grad))


# check_grads: numerical vs automatic derivatives, in float64, at points away
# from the mask and branch boundaries (no support vector near its threshold).
# Excluded by design: hard mining's selection is piecewise constant, straight-through
# ArcFace's gradient is deliberately not the derivative of its value, and
# CurricularFace's t depends on the batch without gradient (checked below with t
# held fixed).
SMOOTH = [n for n in NAMES if n not in ("hard_mining", "arcface_st", "curricularface")]
SMOOTH_FNS = dict(LOSSES)
SMOOTH_FNS["curricular_fixed_t"] = lambda c, y: mj.margin_softmax_loss(
    c,
    y,
    target_fn=functools.partial(mj.arcface_target, margin=0.5),
    non_target_fn=functools.partial(mj.curricular_non_target, t=0.3),
    scale=64.0,
)
SMOOTH.append("curricular_fixed_t")


@pytest.mark.parametrize("name", SMOOTH)
def test_check_grads(name):
    with jax.enable_x64(True):
        cos, labels = random_inputs(batch=3, num_classes=5, seed=11, lo=-0.8, hi=0.8)
        cos = jnp.asarray(cos, jnp.float64)
        target = cos[jnp.arange(3), labels]
        # Keep every non-target at least 0.1 from every threshold it is compared to.
        cos = jnp.where(jnp.abs(cos - target[:, None] + 0.35) < 0.1, cos - 0.25, cos)
        check_grads(
            lambda c: SMOOTH_FNS[name](c, labels) / 64.0,
            (cos,),
            order=1,
            modes=["rev"],
            eps=1e-6,
            atol=1e-5,
            rtol=1e-5,
        )


def test_check_grads_through_cosine_logits():
    with jax.enable_x64(True):
        rng = np.random.default_rng(2)
        x = jnp.asarray(rng.normal(size=(4, 6)))
        w = jnp.asarray(rng.normal(size=(5, 6)))
        labels = jnp.array([0, 4, 2, 2])
        f = lambda x, w: mj.arcface_loss(mj.cosine_logits(x, w), labels, scale=8.0)  # noqa: E731
        check_grads(f, (x, w), order=1, modes=["rev"], eps=1e-6, atol=1e-5, rtol=1e-5)


@functools.cache
def _jitted_value_and_grad(name):
    return jax.jit(jax.value_and_grad(_sum_loss(name)))


@functools.cache
def _jitted_on_embeddings(name):
    return jax.jit(lambda x, w, labels: LOSSES[name](mj.cosine_logits(x, w), labels))


@pytest.mark.parametrize(
    "name", ["normface", "cosface", "arcface", "sv_arc", "mv_am", "eqm", "combined"]
)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_rotation_invariance_and_nonnegativity(name, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4, 8)).astype(np.float32)
    w = rng.normal(size=(6, 8)).astype(np.float32)
    labels = jnp.asarray(rng.integers(0, 6, 4))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    q = q.astype(np.float32)
    loss = _jitted_on_embeddings(name)  # compiled once for all examples
    a = loss(x, w, labels)
    b = loss(x @ q, w @ q, labels)
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3)
    assert np.all(np.asarray(a) >= -1e-6)


@settings(max_examples=25, deadline=None)
@given(
    cos=hnp.arrays(np.float32, (3, 4), elements=st.floats(-1, 1, width=32)),
    labels=hnp.arrays(np.int32, (3,), elements=st.integers(0, 3)),
)
def test_every_loss_finite_on_any_cosines(cos, labels):
    for name in NAMES:
        value, grad = _jitted_value_and_grad(name)(jnp.asarray(cos), labels)
        assert np.isfinite(value) and np.all(np.isfinite(grad)), name
        assert value >= -1e-5, name


def test_scale_can_be_traced_and_scheduled():
    cos, labels = random_inputs()
    f = jax.jit(lambda c, s, m: mj.arcface_loss(c, labels, scale=s, margin=m))
    np.testing.assert_allclose(
        f(cos, 30.0, 0.4),
        mj.arcface_loss(cos, labels, scale=30.0, margin=0.4),
        rtol=1e-6,
    )
    g = jax.grad(lambda m: mj.cosface_loss(cos, labels, margin=m).sum())(0.35)
    assert np.isfinite(g) and g > 0


def test_curricularface_state_update_and_use():
    cos, labels = random_inputs(seed=8)
    state = mj.init_curricular_state()
    loss, new = mj.curricularface_loss(cos, labels, state)
    mean = float(jnp.mean(cos[jnp.arange(cos.shape[0]), labels]))
    np.testing.assert_allclose(float(new.t), 0.01 * mean, rtol=1e-5)
    # The step uses the new t.
    expected = mj.margin_softmax_loss(
        cos,
        labels,
        target_fn=functools.partial(mj.arcface_target, margin=0.5),
        non_target_fn=functools.partial(mj.curricular_non_target, t=new.t),
        scale=64.0,
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    _, newer = jax.jit(mj.curricularface_loss)(cos, labels, new)
    np.testing.assert_allclose(
        float(newer.t), 0.01 * mean + 0.99 * float(new.t), rtol=1e-5
    )
