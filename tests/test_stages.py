"""The registry of named stages and the one composer behind every form.

Every loss of `margin_jax.NAMED_STAGES` gives the same value, state and
gradients (w.r.t. embeddings and W) dense, class-chunked and class-sharded on
8 devices; every named ``*_loss`` is its registered stages through the
composer; a user's own `Stages` runs in every form too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import margin_jax as mj

N_DEV, LOCAL, DIM, SHARD_ROWS, NUM_CLASSES = 8, 3, 6, 2, 13

# Settings that make every stage matter on this small batch: margins large
# enough that support vectors / hard negatives exist, SphereFace both forms.
CASES = {
    **{name: {} for name in mj.NAMED_STAGES},
    "sphereface_original": {"lambda_": 5.0, "scale": None},
    "sv_arc": {"margin_type": "arcface", "margin": 0.5},
    "focal_arc": {"margin": 0.3, "gamma": 1.5},
}
FACTORY = {
    "sphereface_original": "sphereface",
    "sv_arc": "sv_softmax",
    "focal_arc": "focal",
}


def _stages(case):
    return mj.NAMED_STAGES[FACTORY.get(case, case)](**CASES[case])


def _data(seed=0):
    rng = np.random.default_rng(seed)
    batch = N_DEV * LOCAL
    # Non-unit norms (SphereFace's original form uses them); labels < 13 while
    # the shards hold 16 rows, so the last 3 are padding.
    x = rng.normal(size=(batch, DIM)) * rng.uniform(0.5, 2.0, (batch, 1))
    w = rng.normal(size=(N_DEV * SHARD_ROWS, DIM))
    y = rng.integers(0, NUM_CLASSES, batch)
    return (
        jnp.asarray(x, jnp.float32),
        jnp.asarray(w, jnp.float32),
        jnp.asarray(y, jnp.int32),
    )


def _split(out):
    return out if isinstance(out, tuple) else (out, None)


def _dense(stages, x, w, y):
    cos = mj.cosine_logits(x, w[:NUM_CLASSES])
    norm = jnp.linalg.norm(x, axis=-1)
    return _split(mj.margin_softmax_loss(cos, y, stages=stages, feature_norm=norm))


def _chunked(stages, x, w, y):
    return _split(
        mj.chunked_margin_loss(x, w[:NUM_CLASSES], y, stages=stages, chunk_size=5)
    )


def _value_and_grads(form, stages, x, w, y):
    def mean(x, w):
        loss, state = form(stages, x, w, y)
        return loss.mean(), (loss, state)

    (_, (loss, state)), grads = jax.value_and_grad(mean, (0, 1), has_aux=True)(x, w)
    return loss, state, grads


def _sharded(stages, x, w, y):
    """Loss, state and gradients of the global mean under pmap over 8 devices."""

    def local(x, ws, y):
        def objective(x, ws):
            loss, state = _split(
                mj.sharded_margin_loss(
                    x,
                    ws,
                    y,
                    axis_name="d",
                    stages=stages,
                    chunk_size=1,
                    num_classes=NUM_CLASSES,
                )
            )
            # This device's share of the global mean (the sharded form's rule).
            return loss.sum() / (N_DEV * LOCAL), (loss, state)

        (_, (loss, state)), grads = jax.value_and_grad(objective, (0, 1), has_aux=True)(
            x, ws
        )
        return loss, state, grads

    loss, state, (dx, dw) = jax.pmap(local, axis_name="d")(
        x.reshape(N_DEV, LOCAL, DIM),
        w.reshape(N_DEV, SHARD_ROWS, DIM),
        y.reshape(N_DEV, LOCAL),
    )
    if state is not None:  # the same on every device
        for leaf in jax.tree.leaves(state):
            np.testing.assert_allclose(leaf, np.broadcast_to(leaf[0], leaf.shape))
        state = jax.tree.map(lambda s: s[0], state)
    return loss.reshape(-1), state, (dx.reshape(-1, DIM), dw.reshape(-1, DIM))


def _close(a, b, what, atol=2e-6):
    """Close to float32 rounding at s = 64: relative to the array's largest entry."""
    a, b = np.asarray(a), np.asarray(b)
    atol = max(atol, 2e-5 * float(np.max(np.abs(b), initial=0.0)))
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=atol, err_msg=what)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_registered_loss_is_the_same_dense_chunked_and_sharded(case):
    stages = _stages(case)
    x, w, y = _data()
    loss, state, (dx, dw) = _value_and_grads(_dense, stages, x, w, y)
    assert np.all(np.isfinite(loss)) and float(jnp.abs(dx).sum()) > 0
    np.testing.assert_array_equal(dw[NUM_CLASSES:], 0.0)  # the shards' padding
    c_loss, c_state, (c_dx, c_dw) = _value_and_grads(_chunked, stages, x, w, y)
    s_loss, s_state, (s_dx, s_dw) = _sharded(stages, x, w, y)
    for name, (l2, st2, dx2, dw2) in {
        "chunked": (c_loss, c_state, c_dx, c_dw),
        "sharded": (s_loss, s_state, s_dx, s_dw),
    }.items():
        _close(l2, loss, f"{case} {name} loss")
        _close(dx2, dx, f"{case} {name} dL/dx")
        _close(dw2, dw, f"{case} {name} dL/dW")
        assert jax.tree.structure(st2) == jax.tree.structure(state)
        for a, b in zip(jax.tree.leaves(st2), jax.tree.leaves(state), strict=True):
            _close(a, b, f"{case} {name} state")


def test_stateful_entries_return_their_state_and_update_it():
    x, w, y = _data(1)
    for name in ("curricularface", "adacos"):
        stages = mj.NAMED_STAGES[name]()
        assert stages.state is not None
        loss, state = _dense(stages, x, w, y)
        assert loss.shape == (N_DEV * LOCAL,)
        assert jax.tree.structure(state) == jax.tree.structure(stages.state)
        assert not np.allclose(
            jax.tree.leaves(state)[0], jax.tree.leaves(stages.state)[0]
        )


def test_named_losses_are_their_registered_stages():
    rng = np.random.default_rng(2)
    cos = jnp.asarray(rng.uniform(-0.9, 0.9, (6, 9)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 9, 6), jnp.int32)

    def registered(name, **kwargs):
        out = mj.margin_softmax_loss(cos, y, stages=mj.NAMED_STAGES[name](**kwargs))
        return out[0] if isinstance(out, tuple) else out

    named = {
        "normface": mj.normface_loss(cos, y),
        "cosface": mj.cosface_loss(cos, y),
        "arcface": mj.arcface_loss(cos, y),
        "combined": mj.combined_margin_loss(cos, y),
        "sphereface": mj.sphereface_loss(cos, y),
        "adacos_fixed": mj.adacos_loss(cos, y, scale=mj.adacos_fixed_scale(9)),
        "adacos": mj.adacos_loss(
            cos, y, scale=mj.adacos_dynamic_scale(cos, y, mj.adacos_fixed_scale(9))
        ),
        "curricularface": mj.curricularface_loss(cos, y, mj.init_curricular_state())[0],
        "sv_softmax": mj.sv_softmax_loss(cos, y),
        "mv_softmax": mj.mv_softmax_loss(cos, y),
        "eqm": mj.eqm_loss(cos, y, scale=64.0, t1=0.6, t2=0.25),
        "focal": mj.focal_loss(64.0 * cos, y),
        "hard_mining": mj.hard_mining_loss(64.0 * cos, y),
    }
    assert set(named) == set(mj.NAMED_STAGES)
    for name, value in named.items():
        _close(registered(name), value, name, atol=1e-5)


def test_a_composed_stages_runs_in_every_form():
    """A loss the library does not name: CosFace target, squared hard negatives."""

    def target(c):
        return c - 0.25

    def non_target(cos, f):
        return jnp.where(jax.lax.stop_gradient(cos > f), cos + 0.5 * cos**2, cos)

    stages = mj.Stages(target, non_target, 20.0)
    x, w, y = _data(3)
    loss, _, (dx, _) = _value_and_grads(_dense, stages, x, w, y)
    c_loss, _, (c_dx, _) = _value_and_grads(_chunked, stages, x, w, y)
    s_loss, _, (s_dx, _) = _sharded(stages, x, w, y)
    _close(c_loss, loss, "chunked")
    _close(s_loss, loss, "sharded")
    _close(c_dx, dx, "chunked dx")
    _close(s_dx, dx, "sharded dx")


def test_margin_logits_take_stages():
    cos = jnp.array([[0.8, 0.1], [0.3, 0.6]])
    y = jnp.array([0, 1])
    by_stages = mj.margin_logits(cos, y, stages=mj.cosface_stages(scale=10.0))
    by_keywords = mj.margin_logits(
        cos, y, target_fn=functools.partial(mj.cosface_target, margin=0.35), scale=10.0
    )
    np.testing.assert_allclose(by_stages, by_keywords)
    with pytest.raises(ValueError, match="batch statistics or an example weight"):
        mj.margin_logits(cos, y, stages=mj.focal_stages())


def test_stage_errors_name_the_argument():
    cos, y = jnp.array([[0.8, 0.1]]), jnp.array([0])
    with pytest.raises(TypeError, match="give `stages`.*not both"):
        mj.margin_softmax_loss(
            cos, y, stages=mj.arcface_stages(), target_fn=mj.normface_target
        )
    with pytest.raises(TypeError, match="`stages` must be a margin_jax.Stages"):
        mj.margin_softmax_loss(cos, y, stages=(mj.normface_target, None, 1.0))
    with pytest.raises(TypeError, match="give `stages`"):
        mj.margin_softmax_loss(cos, y)
    with pytest.raises(
        ValueError, match=r"scale=None.*pass `feature_norm` \[B\] = \(1,\)"
    ):
        mj.margin_softmax_loss(cos, y, stages=mj.sphereface_stages(scale=None))
    with pytest.raises(ValueError, match="`num_classes` must be an int >= 3"):
        mj.margin_softmax_loss(cos, y, stages=mj.adacos_fixed_stages())
    with pytest.raises(ValueError, match="`margin_type` must be one of"):
        mj.sv_softmax_stages(margin_type="sphere")


def test_default_chunk_size_follows_the_memory_budget():
    budget = mj.MEMORY_BUDGET[jax.default_backend()]
    assert mj.default_chunk_size(256) == budget // (16 * 256)
    assert mj.default_chunk_size(512) == mj.default_chunk_size(256) // 2
    assert mj.default_chunk_size(10**9) == 128
    assert mj.default_chunk_size(256, budget=2**20) == 256
    for batch in (1, 7, 300, 4096):
        assert mj.default_chunk_size(batch) % 128 == 0
