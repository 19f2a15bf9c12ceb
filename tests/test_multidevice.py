"""Losses inside jax.pmap / jax.shard_map over 8 fake CPU devices.

Batch-statistic losses (AdaCos dynamic scale, hard mining, CurricularFace's t)
must give the single-device result on the concatenated batch.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import margin_jax as mj
from margin_jax import collective
from tests.helpers import LOSSES

N_DEV = 8
PER_DEV = 3


def _global_batch(seed=0, num_classes=10):
    rng = np.random.default_rng(seed)
    cos = rng.uniform(-0.9, 0.9, (N_DEV * PER_DEV, num_classes)).astype(np.float32)
    labels = rng.integers(0, num_classes, N_DEV * PER_DEV).astype(np.int32)
    return jnp.asarray(cos), jnp.asarray(labels)


def _shard(x):
    return x.reshape((N_DEV, PER_DEV) + x.shape[1:])


PER_EXAMPLE = [n for n in sorted(LOSSES) if n not in ("hard_mining", "curricularface")]


@pytest.mark.parametrize("name", PER_EXAMPLE)
def test_per_example_losses_under_pmap(name):
    cos, labels = _global_batch()
    fn = LOSSES[name]
    if name == "sphereface_orig":

        def fn(c, y):
            return mj.sphereface_loss(c, y, feature_norm=jnp.full(c.shape[0], 4.0))

    out = jax.pmap(fn, axis_name="d")(_shard(cos), _shard(labels))
    np.testing.assert_allclose(out.reshape(-1), fn(cos, labels), rtol=1e-5, atol=1e-6)


def test_hard_mining_pmap_equals_concatenated_batch():
    cos, labels = _global_batch(seed=1)
    logits = 16.0 * cos
    where = jnp.asarray(np.random.default_rng(2).random(N_DEV * PER_DEV) > 0.2)
    single = mj.hard_mining_loss(logits, labels, keep_ratio=0.6, where=where)
    fn = functools.partial(mj.hard_mining_loss, keep_ratio=0.6, axis_name="d")
    multi = jax.pmap(lambda z, y, w: fn(z, y, where=w), axis_name="d")(
        _shard(logits), _shard(labels), _shard(where)
    )
    np.testing.assert_allclose(multi.reshape(-1), single, rtol=1e-6)
    # Without the axis name each device would keep its own 60%: different.
    local = jax.pmap(
        lambda z, y, w: mj.hard_mining_loss(z, y, keep_ratio=0.6, where=w)
    )(_shard(logits), _shard(labels), _shard(where))
    assert not np.allclose(local.reshape(-1), single)


def test_hard_mining_gradients_pmap_equal_single_device():
    cos, labels = _global_batch(seed=3)

    def total(c, y, axis_name=None):
        return mj.hard_mining_loss(
            16.0 * c, y, keep_ratio=0.5, axis_name=axis_name
        ).sum()

    g_single = jax.grad(total)(cos, labels)
    g_multi = jax.pmap(
        jax.grad(functools.partial(total, axis_name="d")), axis_name="d"
    )(_shard(cos), _shard(labels))
    np.testing.assert_allclose(
        g_multi.reshape(g_single.shape), g_single, rtol=1e-5, atol=1e-6
    )


def test_adacos_dynamic_scale_pmap_equals_concatenated_batch():
    cos, labels = _global_batch(seed=4)
    where = jnp.asarray(np.arange(N_DEV * PER_DEV) % 5 != 0)
    single = mj.adacos_dynamic_scale(cos, labels, 12.0, where=where)
    multi = jax.pmap(
        lambda c, y, w: mj.adacos_dynamic_scale(c, y, 12.0, where=w, axis_name="d"),
        axis_name="d",
    )(_shard(cos), _shard(labels), _shard(where))
    np.testing.assert_allclose(multi, np.full(N_DEV, single), rtol=1e-5)


def test_adacos_training_step_pmap_equals_single_device():
    cos, labels = _global_batch(seed=5)

    def step(c, y, s_prev, axis_name=None):
        s = mj.adacos_dynamic_scale(c, y, s_prev, axis_name=axis_name)
        return mj.adacos_loss(c, y, scale=s).sum(), s

    (loss, s), g = jax.value_and_grad(step, has_aux=True)(cos, labels, 10.0)
    (loss_m, s_m), g_m = jax.pmap(
        jax.value_and_grad(functools.partial(step, axis_name="d"), has_aux=True),
        axis_name="d",
        in_axes=(0, 0, None),
    )(_shard(cos), _shard(labels), 10.0)
    np.testing.assert_allclose(s_m, np.full(N_DEV, s), rtol=1e-5)
    np.testing.assert_allclose(loss_m.sum(), loss, rtol=1e-5)
    np.testing.assert_allclose(g_m.reshape(g.shape), g, rtol=1e-5, atol=1e-6)


def test_curricularface_state_pmap_equals_concatenated_batch():
    cos, labels = _global_batch(seed=6)
    state = mj.CurricularState(t=jnp.float32(0.2))
    loss, new = mj.curricularface_loss(cos, labels, state)
    loss_m, new_m = jax.pmap(
        lambda c, y: mj.curricularface_loss(c, y, state, axis_name="d"), axis_name="d"
    )(_shard(cos), _shard(labels))
    np.testing.assert_allclose(new_m.t, np.full(N_DEV, new.t), rtol=1e-6)
    np.testing.assert_allclose(loss_m.reshape(-1), loss, rtol=1e-5)


def test_hard_mining_under_shard_map_equals_single_device():
    cos, labels = _global_batch(seed=7)
    mesh = Mesh(np.array(jax.devices()), ("d",))
    fn = jax.shard_map(
        lambda z, y: mj.hard_mining_loss(z, y, keep_ratio=0.7, axis_name="d"),
        mesh=mesh,
        in_specs=(P("d"), P("d")),
        out_specs=P("d"),
    )
    np.testing.assert_allclose(
        jax.jit(fn)(16.0 * cos, labels),
        mj.hard_mining_loss(16.0 * cos, labels, keep_ratio=0.7),
        rtol=1e-6,
    )


def test_adacos_under_shard_map_equals_single_device():
    cos, labels = _global_batch(seed=8)
    mesh = Mesh(np.array(jax.devices()), ("d",))
    # The scale is equal on every device (all_gather makes it device-varying in
    # shard_map's type system, so it is returned per device here).
    fn = jax.shard_map(
        lambda c, y: mj.adacos_dynamic_scale(c, y, 9.0, axis_name="d")[None],
        mesh=mesh,
        in_specs=(P("d"), P("d")),
        out_specs=P("d"),
    )
    single = mj.adacos_dynamic_scale(cos, labels, 9.0)
    np.testing.assert_allclose(
        jax.jit(fn)(cos, labels), np.full(N_DEV, single), rtol=1e-5
    )


def _mean_loss(w, x, where, axis_name=None):
    """A replicated parameter w [D] through a per-example term and a global mean."""
    terms = jnp.sum((x - w) ** 2, axis=-1) * jnp.tanh(x @ w)
    return collective.global_mean(terms, where=where, axis_name=axis_name)


def _mean_batch(seed=9):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=4).astype(np.float32))
    x = jnp.asarray(rng.normal(size=(N_DEV * PER_DEV, 4)).astype(np.float32))
    where = jnp.asarray(np.arange(N_DEV * PER_DEV) % 4 != 1)
    return w, x, where


def test_global_mean_gradient_rule_pmap():
    # Value: the global mean on every device. Gradient of a replicated
    # parameter: the psum (not the mean) of the per-device gradients.
    w, x, where = _mean_batch()
    value, grad = jax.value_and_grad(_mean_loss)(w, x, where)

    def step(w, x, m):
        v, g = jax.value_and_grad(_mean_loss)(w, x, m, "d")
        return v, jax.lax.psum(g, "d")

    values, grads = jax.pmap(step, axis_name="d", in_axes=(None, 0, 0))(
        w, _shard(x), _shard(where)
    )
    np.testing.assert_allclose(values, np.full(N_DEV, value), rtol=1e-6)
    np.testing.assert_allclose(grads, np.tile(grad, (N_DEV, 1)), rtol=1e-5, atol=1e-6)


def test_global_mean_gradient_rule_shard_map():
    w, x, where = _mean_batch(seed=10)
    value, grad = jax.value_and_grad(_mean_loss)(w, x, where)
    mesh = Mesh(np.array(jax.devices()), ("d",))

    def shares(w, x, m):
        # A device-varying copy of w: its gradient is this device's share,
        # which the step sums over the axis (as under pmap).
        w_d = jax.lax.pcast(w, "d", to="varying")
        v, g = jax.value_and_grad(_mean_loss)(w_d, x, m, "d")
        return v, jax.lax.psum(g, "d")

    def invariant(w, x, m):
        # The gradient of the invariant w itself: check_vma transposes the
        # implicit cast to varying into that psum already (no second psum).
        return jax.value_and_grad(_mean_loss)(w, x, m, "d")

    for step in (shares, invariant):
        fn = jax.shard_map(
            step,
            mesh=mesh,
            in_specs=(P(), P("d"), P("d")),
            out_specs=(P(), P()),
            check_vma=True,
        )
        got_value, got_grad = jax.jit(fn)(w, x, where)
        np.testing.assert_allclose(got_value, value, rtol=1e-6)
        np.testing.assert_allclose(got_grad, grad, rtol=1e-5, atol=1e-6)
    # Differentiated outside the map, on the replicated scalar.
    outer = jax.shard_map(
        lambda w, x, m: _mean_loss(w, x, m, "d"),
        mesh=mesh,
        in_specs=(P(), P("d"), P("d")),
        out_specs=P(),
    )
    got_value, got_grad = jax.jit(jax.value_and_grad(outer))(w, x, where)
    np.testing.assert_allclose(got_value, value, rtol=1e-6)
    np.testing.assert_allclose(got_grad, grad, rtol=1e-5, atol=1e-6)
