"""Chunked, sharded and Partial FC forms equal the dense loss, value and gradient."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import margin_jax as mj
from tests.helpers import STAGES

N_DEV = 8


def _data(batch=12, dim=16, num_classes=37, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, dim)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(num_classes, dim)), jnp.float32)
    y = rng.integers(0, num_classes, batch)
    y[1] = num_classes - 1  # a label in the last chunk
    y[2] = 0
    return x, w, jnp.asarray(y, jnp.int32)


def _dense(name, x, w, y, where=None):
    stages = STAGES[name]
    return mj.margin_softmax_loss(
        mj.cosine_logits(x, w),
        y,
        stages=stages,
        where=where,
    )


def _assert_close(a, b, rtol=1e-5):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.max(np.abs(b)))


# Every loss with blocks that do not divide C (5); the block loop's edge cases
# (8: another remainder, 37: one block, 64 > C) are the same code for every
# stage, so they run for a target-only and a non-target (mask) loss.
_CHUNK_CASES = [(name, 5) for name in sorted(STAGES)] + [
    (name, chunk) for name in ("arcface", "sv_arc") for chunk in (8, 37, 64)
]


@pytest.mark.parametrize("name, chunk", _CHUNK_CASES)
def test_chunked_equals_dense(name, chunk):
    # 37 classes: chunk 5 and 8 do not divide C, 37 is one block, 64 > C.
    x, w, y = _data()
    stages = STAGES[name]

    def chunked(x, w):
        return mj.chunked_margin_loss(
            x,
            w,
            y,
            stages=stages,
            chunk_size=chunk,
        )

    def dense(x, w):
        return _dense(name, x, w, y)

    _assert_close(jax.jit(chunked)(x, w), dense(x, w))
    g_chunk = jax.jit(jax.grad(lambda x, w: chunked(x, w).sum(), argnums=(0, 1)))(x, w)
    g_dense = jax.grad(lambda x, w: dense(x, w).sum(), argnums=(0, 1))(x, w)
    _assert_close(g_chunk[0], g_dense[0])
    _assert_close(g_chunk[1], g_dense[1])


def test_chunked_where_and_per_example_scale():
    x, w, y = _data(seed=1)
    where = jnp.arange(12) % 4 != 1
    norms = jnp.linalg.norm(x, axis=-1)
    target_fn = functools.partial(mj.sphereface_target, margin=3, lambda_=1.0)

    def chunked(x, w):  # SphereFace's original form: scale = ||x||
        return mj.chunked_margin_loss(
            x,
            w,
            y,
            target_fn=target_fn,
            scale=jnp.linalg.norm(x, axis=-1),
            chunk_size=7,
            where=where,
        )

    def dense(x, w):
        return mj.sphereface_loss(
            mj.cosine_logits(x, w),
            y,
            margin=3,
            lambda_=1.0,
            feature_norm=jnp.linalg.norm(x, axis=-1),
            where=where,
        )

    _assert_close(chunked(x, w), dense(x, w))
    assert np.all(np.asarray(chunked(x, w))[~np.asarray(where)] == 0)
    g1 = jax.grad(lambda x: chunked(x, w).sum())(x)
    g2 = jax.grad(lambda x: dense(x, w).sum())(x)
    _assert_close(g1, g2)
    assert np.all(np.asarray(g1)[~np.asarray(where)] == 0)
    del norms


def test_chunked_gradient_wrt_traced_hyperparameter():
    x, w, y = _data(seed=2)

    def loss(t, chunked):
        stages = dict(
            target_fn=functools.partial(mj.cosface_target, margin=0.3),
            non_target_fn=functools.partial(mj.mv_non_target, t=t),
            scale=16.0,
        )
        if chunked:
            return mj.chunked_margin_loss(x, w, y, chunk_size=6, **stages).sum()
        return mj.margin_softmax_loss(mj.cosine_logits(x, w), y, **stages).sum()

    _assert_close(
        jax.jit(jax.grad(loss), static_argnums=1)(0.2, True), jax.grad(loss)(0.2, False)
    )


def test_chunked_bf16_inputs():
    x, w, y = _data(seed=3)
    target_fn, scale = STAGES["arcface"].target_fn, STAGES["arcface"].scale
    out = mj.chunked_margin_loss(
        x.astype(jnp.bfloat16),
        w.astype(jnp.bfloat16),
        y,
        target_fn=target_fn,
        scale=scale,
        chunk_size=8,
    )
    assert out.dtype == jnp.float32
    _assert_close(
        out, _dense("arcface", x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), y)
    )
    g = jax.grad(
        lambda w: mj.chunked_margin_loss(
            x, w, y, target_fn=target_fn, scale=scale, chunk_size=8
        ).sum()
    )(w.astype(jnp.bfloat16))
    assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


def test_chunked_errors():
    x, w, y = _data()
    f = STAGES["arcface"].target_fn
    with pytest.raises(ValueError, match=r"`chunk_size` must be a positive int"):
        mj.chunked_margin_loss(x, w, y, target_fn=f, scale=1.0, chunk_size=0)
    with pytest.raises(ValueError, match=r"must share D.*\(12, 16\).*\(37, 8\)"):
        mj.chunked_margin_loss(x, w[:, :8], y, target_fn=f, scale=1.0)
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 37\)"):
        mj.chunked_margin_loss(x, w, y.at[0].set(37), target_fn=f, scale=1.0)
    with pytest.raises(TypeError, match=r"`labels` must be an integer"):
        mj.chunked_margin_loss(x, w, y.astype(jnp.float32), target_fn=f, scale=1.0)


# ---------------------------------------------------------------- sharded


def _pad_shards(w, n_dev=N_DEV):
    rows = -(-w.shape[0] // n_dev)
    pad = jnp.zeros((n_dev * rows - w.shape[0], w.shape[1]), w.dtype)
    return jnp.concatenate([w, pad]).reshape(n_dev, rows, w.shape[1])


def _sharded_grads(name, x, w, y, chunk=None, where=None):
    stages = STAGES[name]
    batch, num_classes = x.shape[0], w.shape[0]

    def local(x, ws, y, wh):
        loss = mj.sharded_margin_loss(
            x,
            ws,
            y,
            axis_name="d",
            stages=stages,
            chunk_size=chunk,
            num_classes=num_classes,
            where=wh,
        )
        return loss.sum() / batch, loss

    wh = jnp.ones(batch, bool) if where is None else where
    (_, loss), (gx, gw) = jax.pmap(
        jax.value_and_grad(local, argnums=(0, 1), has_aux=True), axis_name="d"
    )(
        x.reshape(N_DEV, -1, x.shape[1]),
        _pad_shards(w),
        y.reshape(N_DEV, -1),
        wh.reshape(N_DEV, -1),
    )
    gw = gw.reshape(-1, w.shape[1])
    return loss.reshape(-1), gx.reshape(x.shape), gw[:num_classes], gw[num_classes:]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_sharded_equals_dense_on_8_devices(name):
    x, w, y = _data(batch=16)  # 37 classes over 8 devices: uneven (5 per shard)
    loss, gx, gw, g_pad = _sharded_grads(name, x, w, y, chunk=2)
    _assert_close(loss, _dense(name, x, w, y))
    gx_d, gw_d = jax.grad(lambda x, w: _dense(name, x, w, y).mean(), argnums=(0, 1))(
        x, w
    )
    _assert_close(gx, gx_d)
    _assert_close(gw, gw_d)
    assert np.all(np.asarray(g_pad) == 0)  # padding rows get no gradient


def test_sharded_where_matches_dense():
    x, w, y = _data(batch=16, seed=4)
    where = jnp.arange(16) % 3 != 0
    loss, gx, gw, _ = _sharded_grads("sv_arc", x, w, y, where=where)
    _assert_close(loss, _dense("sv_arc", x, w, y, where=where))
    gx_d, gw_d = jax.grad(
        lambda x, w: _dense("sv_arc", x, w, y, where=where).sum() / 16, argnums=(0, 1)
    )(x, w)
    _assert_close(gx, gx_d)
    _assert_close(gw, gw_d)


def test_sharded_under_shard_map():
    x, w, y = _data(batch=16, num_classes=40, seed=5)
    target_fn, scale = STAGES["arcface"].target_fn, STAGES["arcface"].scale
    mesh = Mesh(np.array(jax.devices()), ("d",))

    def local(x, ws, y):
        loss = mj.sharded_margin_loss(
            x, ws, y, axis_name="d", target_fn=target_fn, scale=scale, chunk_size=3
        )
        return loss

    fn = jax.jit(
        jax.shard_map(
            local, mesh=mesh, in_specs=(P("d"), P("d"), P("d")), out_specs=P("d")
        )
    )
    _assert_close(fn(x, w, y), _dense("arcface", x, w, y))

    def total(x, w):
        return fn(x, w, y).mean()

    g = jax.grad(total, argnums=(0, 1))(x, w)
    g_d = jax.grad(lambda x, w: _dense("arcface", x, w, y).mean(), argnums=(0, 1))(x, w)
    _assert_close(g[0], g_d[0])
    _assert_close(g[1], g_d[1])


# ---------------------------------------------------------------- Partial FC


@functools.cache
def _partial_fc_step(rate, num_classes, batch, name):
    """The pmapped Partial FC step, compiled once per setting (key is an input)."""
    stages = STAGES[name]

    def local(x, ws, y, key):
        sample = mj.partial_fc_sample(
            y, ws.shape[0], rate=rate, key=key, axis_name="d", total_classes=num_classes
        )
        loss = mj.sharded_margin_loss(
            x,
            ws[sample.index],
            sample.labels,
            axis_name="d",
            stages=stages,
            num_valid=sample.num_valid,
        )
        return loss.sum() / batch, (loss, sample)

    return jax.pmap(
        jax.value_and_grad(local, argnums=(0, 1), has_aux=True),
        axis_name="d",
        in_axes=(0, 0, 0, None),
    )


def _partial_fc_run(x, w_shards, y, rate, key, num_classes, name="cosface"):
    step = _partial_fc_step(rate, num_classes, x.shape[0], name)
    return step(x.reshape(N_DEV, -1, x.shape[1]), w_shards, y.reshape(N_DEV, -1), key)


def test_partial_fc_rate_one_equals_sharded():
    x, w, y = _data(batch=16, seed=6)
    (_, (loss, sample)), (gx, gw) = _partial_fc_run(
        x, _pad_shards(w), y, 1.0, jax.random.key(0), w.shape[0]
    )
    ref_loss, ref_gx, ref_gw, _ = _sharded_grads("cosface", x, w, y)
    np.testing.assert_array_equal(loss.reshape(-1), ref_loss)
    np.testing.assert_allclose(gx.reshape(x.shape), ref_gx, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        gw.reshape(-1, w.shape[1])[: w.shape[0]], ref_gw, rtol=1e-6, atol=1e-7
    )
    np.testing.assert_array_equal(sample.labels.reshape(-1), y)


def test_partial_fc_always_samples_positives_and_only_they_get_gradient():
    rng = np.random.default_rng(7)
    num_classes, rows = 800, 100  # 100 classes per device, rate 0.1 -> 16 sampled
    w = jnp.asarray(rng.normal(size=(num_classes, 8)), jnp.float32)
    for seed in range(20):
        y = jnp.asarray(rng.integers(0, num_classes, 16), jnp.int32)
        x = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
        (_, (loss, sample)), (_, gw) = _partial_fc_run(
            x, w.reshape(N_DEV, rows, 8), y, 0.1, jax.random.key(seed), num_classes
        )
        index = np.asarray(sample.index)  # [dev, n]
        n = index.shape[1]
        assert n == 16
        sampled = {d * rows + int(i) for d in range(N_DEV) for i in index[d]}
        assert set(np.asarray(y).tolist()) <= sampled
        # Remapped labels point at the right rows.
        remapped = np.asarray(sample.labels).reshape(-1)
        global_rows = np.array([d * rows + index[d] for d in range(N_DEV)]).reshape(-1)
        np.testing.assert_array_equal(global_rows[remapped], np.asarray(y))
        # Gradient only on sampled rows.
        touched = np.flatnonzero(np.abs(np.asarray(gw).reshape(-1, 8)).sum(-1) > 0)
        assert set(touched.tolist()) <= sampled
        assert np.all(np.isfinite(loss))


def test_partial_fc_single_shard_and_errors():
    y = jnp.array([3, 7, 7, 99])
    s = mj.partial_fc_sample(y, 100, rate=0.05, key=jax.random.key(1))
    assert s.index.shape == (5,)
    np.testing.assert_array_equal(np.asarray(s.index)[np.asarray(s.labels)], y)
    assert int(s.num_valid) == 5
    with pytest.raises(ValueError, match=r"`rate` must be in \(0, 1\]"):
        mj.partial_fc_sample(y, 100, rate=0.0, key=jax.random.key(1))
