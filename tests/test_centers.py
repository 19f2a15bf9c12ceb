"""Tests for margin_jax.centers: center loss and the Δc centre update."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from margin_jax import centers
from margin_jax.centers import CenterState, center_loss, init_centers, update_centers
from tests import reference_pairs as ref

C, D = 5, 3


def _batch(seed=0, b=10):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, D)).astype(np.float32)
    y = rng.integers(0, C - 1, b)  # class C - 1 never appears
    c = rng.normal(size=(C, D)).astype(np.float32)
    return x, y, CenterState(centers=jnp.asarray(c))


def test_init_centers():
    state = init_centers(C, D)
    assert isinstance(state, CenterState)
    assert state.centers.shape == (C, D) and state.centers.dtype == jnp.float32
    assert np.all(np.asarray(state.centers) == 0)
    assert jax.tree.leaves(state)[0] is state.centers  # a pytree


def test_center_loss_matches_reference():
    x, y, state = _batch()
    got = jax.jit(center_loss)(x, y, state)
    np.testing.assert_allclose(got, ref.center_loss(x, y, state.centers), rtol=1e-5)


def test_center_loss_gradient_only_to_embeddings():
    x, y, state = _batch(1)
    g_x, g_state = jax.jit(
        jax.grad(lambda x, s: center_loss(x, y, s).sum(), argnums=(0, 1))
    )(x, state)
    c = np.asarray(state.centers)
    np.testing.assert_allclose(g_x, x - c[y], rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(g_state.centers) == 0)


def test_center_loss_where_and_padding_labels():
    x, y, state = _batch(2)
    w = np.arange(10) % 4 != 1
    x_pad = np.where(w[:, None], x, np.nan).astype(np.float32)
    y_pad = np.where(w, y, -1)  # padding label outside [0, C): fine under where
    f = jax.jit(lambda x: center_loss(x, y_pad, state, where=w))
    loss, vjp = jax.vjp(f, x_pad)
    np.testing.assert_allclose(np.asarray(loss)[w], center_loss(x[w], y[w], state))
    assert np.all(np.asarray(loss)[~w] == 0)
    (g,) = vjp(jnp.ones(10))
    assert np.all(np.asarray(g)[~w] == 0) and np.all(np.isfinite(g))


def test_bf16_promoted():
    x, y, state = _batch(3)
    loss = center_loss(jnp.asarray(x, jnp.bfloat16), y, state)
    assert loss.dtype == jnp.float32
    new = update_centers(state, jnp.asarray(x, jnp.bfloat16), y)
    assert new.centers.dtype == jnp.float32


def test_update_matches_delta_formula_with_repeated_labels():
    x, _, state = _batch(4)
    y = np.array([0, 0, 0, 2, 2, 1, 0, 2, 2, 0])  # n_0 = 5, n_1 = 1, n_2 = 4
    f = jax.jit(lambda s, x, a: update_centers(s, x, y, alpha=a))
    for alpha in (0.5, 0.1, 1.0):
        new = f(state, x, alpha)
        expected = ref.update_centers(state.centers, x, y, alpha)
        np.testing.assert_allclose(new.centers, expected, rtol=1e-5, atol=1e-6)
        # Classes 3 and 4 are absent: bit-for-bit unchanged.
        assert np.array_equal(
            np.asarray(new.centers)[3:], np.asarray(state.centers)[3:]
        )
    # A hand check of class 1 (n_1 = 1): Δc = (c - x_5) / 2.
    c1 = np.asarray(state.centers)[1]
    new = update_centers(state, x, y, alpha=0.5)
    np.testing.assert_allclose(new.centers[1], c1 - 0.25 * (c1 - x[5]), rtol=1e-6)


def test_update_where_equals_slicing_and_no_gradient():
    x, y, state = _batch(5)
    w = np.arange(10) >= 3
    x_pad = np.where(w[:, None], x, np.nan).astype(np.float32)
    f = jax.jit(lambda s, x: update_centers(s, x, np.where(w, y, 99), where=w))
    np.testing.assert_allclose(
        f(state, x_pad).centers, update_centers(state, x[w], y[w]).centers, rtol=1e-6
    )
    g = jax.grad(lambda x: update_centers(state, x, y).centers.sum())(x)
    assert np.all(np.asarray(g) == 0)


def test_jitted_step_keeps_centres_out_of_optimiser_state():
    # Linear embedding + softmax classifier, CE + λ·center loss, adam on params only.
    rng = np.random.default_rng(6)
    d_in, lam = 7, 0.003
    params = {
        "emb": jnp.asarray(rng.normal(size=(d_in, D)), jnp.float32),
        "cls": jnp.asarray(rng.normal(size=(D, C)), jnp.float32),
    }
    images = jnp.asarray(rng.normal(size=(16, d_in)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, C, 16))
    tx = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state, state, images, labels):
        def loss_fn(params):
            emb = images @ params["emb"]
            logits = emb @ params["cls"]
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            return ce.mean() + lam * center_loss(emb, labels, state).mean(), emb

        (loss, emb), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        state = update_centers(state, emb, labels, alpha=0.5)
        return params, opt_state, state, loss

    opt_state = tx.init(params)
    state = init_centers(C, D)
    for _ in range(3):
        old = state
        params, opt_state, state, loss = step(params, opt_state, state, images, labels)
        assert np.isfinite(loss)
        assert not np.allclose(state.centers, old.centers)
    shapes = {leaf.shape for leaf in jax.tree.leaves(opt_state)}
    assert (C, D) not in shapes  # no centres in the optimiser state
    assert jax.tree.structure(opt_state) == jax.tree.structure(tx.init(params))


NDEV, LOCAL = 8, 3


def _sharded(seed=7):
    rng = np.random.default_rng(seed)
    n = NDEV * LOCAL
    x = rng.normal(size=(n, D)).astype(np.float32)
    y = rng.integers(0, C - 1, n)
    w = rng.random(n) > 0.2
    c = jnp.asarray(rng.normal(size=(C, D)), jnp.float32)
    return x, y, w, CenterState(centers=c)


def test_update_axis_name_pmap():
    x, y, w, state = _sharded()
    expected = update_centers(state, x, y, where=w, alpha=0.3).centers
    shape = (NDEV, LOCAL)
    got = jax.pmap(
        lambda s, x, y, w: update_centers(s, x, y, where=w, alpha=0.3, axis_name="i"),
        axis_name="i",
        in_axes=(None, 0, 0, 0),
    )(state, x.reshape(*shape, D), y.reshape(shape), w.reshape(shape))
    for device in range(NDEV):
        np.testing.assert_allclose(got.centers[device], expected, rtol=1e-5, atol=1e-6)


def test_update_axis_name_shard_map():
    x, y, w, state = _sharded(8)
    expected = update_centers(state, x, y, where=w).centers
    mesh = jax.make_mesh((NDEV,), ("i",))
    xs, ys, ws = (jax.device_put(a, NamedSharding(mesh, P("i"))) for a in (x, y, w))
    f = jax.shard_map(
        lambda s, x, y, w: update_centers(s, x, y, where=w, axis_name="i"),
        mesh=mesh,
        in_specs=(P(), P("i"), P("i"), P("i")),
        out_specs=P(),
    )
    with jax.set_mesh(mesh):
        got = jax.jit(f)(state, xs, ys, ws)
    np.testing.assert_allclose(got.centers, expected, rtol=1e-5, atol=1e-6)


def _raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def test_errors():
    x, y, state = _batch()
    _raises(ValueError, r"`num_classes` must be a positive int", init_centers, 0, 3)
    _raises(ValueError, r"`dim` must be a positive int", init_centers, 3, 2.0)
    _raises(
        TypeError, r"`dtype` must be a floating", init_centers, 3, 2, dtype=jnp.int32
    )
    _raises(
        TypeError, r"`state` must be a CenterState", center_loss, x, y, state.centers
    )
    _raises(
        ValueError,
        r"center_loss: `embeddings` must have rank 2.*\(10,\)",
        center_loss,
        x[:, 0],
        y,
        state,
    )
    _raises(
        TypeError,
        r"`embeddings` must be a floating-point.*int",
        update_centers,
        state,
        y.reshape(5, 2)[:, :1].repeat(3, 1),
        y[:5],
    )
    _raises(ValueError, r"same D.*\(10, 2\).*\(5, 3\)", center_loss, x[:, :2], y, state)
    _raises(
        ValueError,
        r"`labels` must have shape \[B\] = \(10,\).*\(9,\)",
        update_centers,
        state,
        x,
        y[:9],
    )
    _raises(
        TypeError,
        r"`labels` must be an integer",
        center_loss,
        x,
        y.astype(np.float32),
        state,
    )
    _raises(
        ValueError,
        r"`labels` must lie in \[0, 5\).*\[0, 7\]",
        update_centers,
        state,
        x,
        np.where(np.arange(10) == 0, 7, y),
    )
    _raises(
        TypeError,
        r"`where` must be a boolean",
        center_loss,
        x,
        y,
        state,
        where=np.ones(10),
    )


def test_docstring_examples():
    result = doctest.testmod(centers)
    assert result.failed == 0 and result.attempted >= 4
