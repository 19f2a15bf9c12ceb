"""Tests for margin_jax.pairs against the float64 loop references."""

import doctest
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from margin_jax import pairs
from margin_jax.pairs import (
    contrastive_loss,
    mine_batch_all,
    mine_batch_hard,
    mine_semi_hard,
    negative_mask,
    npair_loss,
    pairwise_distances,
    positive_mask,
    triplet_loss,
    triplet_loss_with_stats,
    two_head_loss,
)
from tests import reference_pairs as ref

B, D = 12, 5
MININGS = ("semi_hard", "batch_hard", "batch_all")
METRICS = ("squared_l2", "l2", "cosine")


# ------------------------------------------------------------------------------
# Batches. All share the shape [12, 5], so each jitted configuration compiles once.


def _random_batch(seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(B, D)).astype(np.float32), rng.integers(0, 4, B)


def _one_class():
    x, _ = _random_batch(1)
    return x, np.zeros(B, np.int64)


def _singletons():
    x, _ = _random_batch(2)
    return x, np.arange(B)


def _duplicates():
    # Values on a 1/4 grid: every squared distance is exact in float32, so the
    # many exact ties (duplicates inside and across classes) resolve identically
    # here and in the float64 reference.
    rng = np.random.default_rng(3)
    x = rng.integers(-4, 5, size=(B, D)).astype(np.float32) / 4
    x[1] = x[0]  # duplicate positive
    x[4] = x[0]  # duplicate negative
    x[7] = x[6]
    x[8] = x[6]
    return x, np.array([0, 0, 1, 1, 1, 0, 2, 2, 1, 3, 3, 2])


def _negatives_closer():
    # Class k sits at +L u_k and -L u_k: its two members are 2L apart, further than
    # any other point, so every anchor's negatives are all closer than its positive.
    rng = np.random.default_rng(4)
    u = rng.normal(size=(B // 2, D))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    x = np.concatenate([3 * u, -3 * u]).astype(np.float32)
    return x, np.concatenate([np.arange(B // 2), np.arange(B // 2)])


BATCHES = {
    "random": _random_batch,
    "one_class": _one_class,
    "singletons": _singletons,
    "duplicates": _duplicates,
    "negatives_closer": _negatives_closer,
}


@functools.partial(jax.jit, static_argnames=("mining", "metric", "soft"))
def _triplet_jit(x, y, where, *, mining, metric, soft):
    return triplet_loss_with_stats(
        x, y, mining=mining, metric=metric, soft=soft, where=where
    )


def _triplet(x, y, where=None, *, mining, metric="squared_l2", soft=False):
    # Always pass every static argument, so equal configurations share one compile.
    return _triplet_jit(x, y, where, mining=mining, metric=metric, soft=soft)


def test_negatives_closer_batch_is_what_it_claims():
    x, y = _negatives_closer()
    d = ref.distances(x, "squared_l2")
    for a in range(B):
        p = [j for j in range(B) if j != a and y[j] == y[a]][0]
        assert all(d[a, n] < d[a, p] for n in range(B) if y[n] != y[a])


# ------------------------------------------------------------------------------
# Distances and masks.


@pytest.mark.parametrize("metric", METRICS)
def test_pairwise_distances_match_reference(metric):
    x, _ = _random_batch()
    got = np.asarray(pairwise_distances(x, metric=metric))
    np.testing.assert_allclose(got, ref.distances(x, metric), rtol=1e-5, atol=2e-6)
    assert np.all(np.diag(got) == 0)


@pytest.mark.parametrize("metric", METRICS)
def test_distance_gradient_finite_at_zero_distance(metric):
    x, _ = _duplicates()
    g = jax.jit(jax.grad(lambda x: pairwise_distances(x, metric=metric).sum()))(x)
    assert np.all(np.isfinite(g))
    # Rows 0, 1, 4 coincide: the zero distances among them add no gradient, so
    # duplicated rows get equal gradients (each is pushed by the same others).
    np.testing.assert_allclose(g[0], g[1], rtol=1e-6)


def test_l2_safe_sqrt_zero_gradient():
    x = jnp.ones((2, 3))
    g = jax.grad(lambda x: pairwise_distances(x, metric="l2")[0, 1])(x)
    assert np.all(np.asarray(g) == 0)


def test_bf16_promoted():
    x, y = _random_batch()
    d = pairwise_distances(jnp.asarray(x, jnp.bfloat16))
    assert d.dtype == jnp.float32
    loss = triplet_loss(jnp.asarray(x, jnp.bfloat16), y)
    assert loss.dtype == jnp.float32 and np.isfinite(loss)


def test_masks():
    y = np.array([0, 0, 1, 0, 2])
    w = np.array([True, True, True, False, True])
    pos = np.asarray(positive_mask(y, where=w))
    neg = np.asarray(negative_mask(y, where=w))
    for i in range(5):
        for j in range(5):
            both = w[i] and w[j]
            assert pos[i, j] == (both and i != j and y[i] == y[j])
            assert neg[i, j] == (both and y[i] != y[j])


# ------------------------------------------------------------------------------
# Miners.


@pytest.mark.parametrize("batch", BATCHES)
def test_semi_hard_miner_matches_reference(batch):
    x, y = BATCHES[batch]()
    d = pairwise_distances(x)
    neg, valid = map(np.asarray, mine_semi_hard(d, y))
    expected = ref.semi_hard_choices(x, y)
    assert set(zip(*np.nonzero(valid), strict=True)) == set(expected)
    d = np.asarray(d)
    for (a, p), dn in expected.items():
        assert y[neg[a, p]] != y[a]
        np.testing.assert_allclose(d[a, neg[a, p]], dn, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", BATCHES)
def test_batch_hard_miner_matches_reference(batch):
    x, y = BATCHES[batch]()
    d = pairwise_distances(x)
    p, n, valid = map(np.asarray, mine_batch_hard(d, y))
    expected = ref.batch_hard_choices(x, y)
    assert set(np.nonzero(valid)[0]) == set(expected)
    d = np.asarray(d)
    for a, (dp, dn) in expected.items():
        assert y[p[a]] == y[a] and p[a] != a and y[n[a]] != y[a]
        np.testing.assert_allclose(
            [d[a, p[a]], d[a, n[a]]], [dp, dn], rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("batch", BATCHES)
def test_batch_all_miner_matches_reference(batch):
    _, y = BATCHES[batch]()
    got = set(zip(*np.nonzero(np.asarray(mine_batch_all(y))), strict=True))
    assert got == set(ref.all_triplets(y))


def test_semi_hard_worked_example():
    # 1-D embeddings, squared L2, margin 0.5. A = {0, 1}, B = {2, 3, 4}.
    x = np.array([[0.0], [1.0], [1.1], [-1.2], [3.0]], np.float32)
    y = np.array([0, 0, 1, 1, 1])
    # Squared distances:
    #   d01 = 1      d02 = 1.21   d03 = 1.44   d04 = 9
    #   d12 = 0.01   d13 = 4.84   d14 = 4      d23 = 5.29   d24 = 3.61   d34 = 17.64
    # Pair (a, p): D(a,p); negatives of a; those farther than D(a,p) -> choice, loss.
    #   (0, 1): 1;     {2: 1.21, 3: 1.44, 4: 9}; farther 1.21, 1.44, 9 -> 2 (1.21),
    #           semi-hard (1.21 < 1 + 0.5): loss 1 - 1.21 + 0.5 = 0.29
    #   (1, 0): 1;     {2: 0.01, 3: 4.84, 4: 4}; farther 4.84, 4 -> 4 (4), easy: 0
    #   (2, 3): 5.29;  {0: 1.21, 1: 0.01}; none farther -> farthest 0 (1.21), hard:
    #           5.29 - 1.21 + 0.5 = 4.58
    #   (2, 4): 3.61;  same negatives, none farther -> 0 (1.21): 2.9
    #   (3, 2): 5.29;  {0: 1.44, 1: 4.84}; none farther -> 1 (4.84): 0.95
    #   (3, 4): 17.64; none farther -> 1 (4.84): 13.3
    #   (4, 2): 3.61;  {0: 9, 1: 4}; farther 9, 4 -> 1 (4), semi-hard: 0.11
    #   (4, 3): 17.64; none farther -> farthest 0 (9): 9.14
    # Mean over the 8 positive pairs: 31.27 / 8 = 3.90875.
    expected = {
        (0, 1): 2,
        (1, 0): 4,
        (2, 3): 0,
        (2, 4): 0,
        (3, 2): 1,
        (3, 4): 1,
        (4, 2): 1,
        (4, 3): 0,
    }
    neg, valid = map(np.asarray, mine_semi_hard(pairwise_distances(x), y))
    assert {
        (a, p): int(neg[a, p]) for a, p in zip(*np.nonzero(valid), strict=True)
    } == expected
    # Only the order of distances matters: shifted, even negative, values agree.
    neg, _ = map(np.asarray, mine_semi_hard(pairwise_distances(x) - 5.0, y))
    assert all(neg[a, p] == n for (a, p), n in expected.items())
    loss, stats = triplet_loss_with_stats(x, y, margin=0.5)
    np.testing.assert_allclose(loss, 31.27 / 8, rtol=1e-5)
    assert int(stats["num_positive_pairs"]) == 8 and int(stats["num_terms"]) == 8
    assert int(stats["num_active"]) == 7
    assert ref.triplet_semi_hard(x, y, margin=0.5) == pytest.approx(31.27 / 8)


# ------------------------------------------------------------------------------
# Triplet loss against the loop references.

# Every miner with squared L2, hinge and soft; the other metrics on a subset.
CONFIGS = [(m, "squared_l2", soft) for m in MININGS for soft in (False, True)] + [
    ("semi_hard", "l2", False),
    ("semi_hard", "cosine", False),
    ("batch_hard", "cosine", True),
    ("batch_all", "l2", False),
]


@pytest.mark.parametrize("mining,metric,soft", CONFIGS)
def test_triplet_matches_reference(mining, metric, soft):
    for name, make in BATCHES.items():
        if name == "duplicates" and metric == "cosine":
            continue  # cosines of grid points are inexact: ties could flip
        x, y = make()
        loss, stats = _triplet(x, y, mining=mining, metric=metric, soft=soft)
        expected = ref.triplet(x, y, mining=mining, metric=metric, soft=soft)
        assert np.isfinite(loss), name
        np.testing.assert_allclose(loss, expected, rtol=2e-5, atol=2e-6, err_msg=name)
        if name in ("one_class", "singletons"):
            assert float(loss) == 0.0 and not bool(stats["valid"]), name


def test_no_positive_pair_is_zero_with_zero_gradient():
    x, y = _singletons()

    @jax.jit
    def losses_and_grads(x):
        return [
            jax.value_and_grad(lambda x, m=m: triplet_loss(x, y, mining=m))(x)
            for m in MININGS
        ]

    for loss, g in losses_and_grads(x):
        assert float(loss) == 0.0 and np.all(np.asarray(g) == 0)


def test_stats():
    x, y = _random_batch()
    for mining in MININGS:
        _, s = _triplet(x, y, mining=mining)
        assert int(s["num_positive_pairs"]) == int(np.asarray(positive_mask(y)).sum())
        assert 0 <= int(s["num_active"]) <= int(s["num_terms"])
        np.testing.assert_allclose(
            s["fraction_active"], int(s["num_active"]) / int(s["num_terms"])
        )
    _, s = _triplet(x, y, mining="batch_all")
    assert int(s["num_terms"]) == len(ref.all_triplets(y))


@pytest.mark.parametrize("mining", MININGS)
def test_triplet_where_equals_slicing_and_blocks_gradient(mining):
    x, y = _random_batch(5)
    w = np.ones(B, bool)
    w[[2, 7, 11]] = False
    x_pad = x.copy()
    x_pad[~w] = np.nan  # garbage in padded rows must not leak anywhere
    f = lambda x: _triplet(x, y, w, mining=mining)[0]  # noqa: E731
    loss, g = jax.jit(jax.value_and_grad(f))(x_pad)
    sliced, g_sliced = jax.jit(
        jax.value_and_grad(lambda x: triplet_loss(x, y[w], mining=mining))
    )(x[w])
    np.testing.assert_allclose(loss, sliced, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g)[w], g_sliced, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(g)[~w] == 0)


def test_margin_is_traceable():
    x, y = _random_batch()
    f = jax.jit(lambda m: triplet_loss(x, y, margin=m, mining="batch_hard"))
    np.testing.assert_allclose(
        f(0.5), ref.triplet_batch_hard(x, y, margin=0.5), rtol=1e-5
    )


# ------------------------------------------------------------------------------
# Gradients.

GRAD_CONFIGS = [
    ("semi_hard", "squared_l2", False),
    ("batch_hard", "l2", False),
    ("batch_all", "cosine", True),
]


@pytest.mark.parametrize("mining,metric,soft", GRAD_CONFIGS)
def test_triplet_check_grads(mining, metric, soft):
    x, y = _random_batch(6)
    with jax.enable_x64(True):
        x64 = jnp.asarray(x, jnp.float64)

        def f(x):
            return triplet_loss(
                x, y, margin=0.5, mining=mining, metric=metric, soft=soft
            )

        check_grads(jax.jit(f), (x64,), order=1, modes=("rev",), eps=1e-6)


@pytest.mark.parametrize("mining", MININGS)
def test_gradients_finite_with_duplicates(mining):
    x, y = _duplicates()
    x[2] = x[3]  # a duplicated positive pair too
    variants = [("squared_l2", True), ("l2", False), ("cosine", False)]

    @jax.jit
    def grads(x):
        return [
            jax.grad(
                lambda x, m=m, s=s: triplet_loss(x, y, mining=mining, metric=m, soft=s)
            )(x)
            for m, s in variants
        ]

    for variant, g in zip(variants, grads(x), strict=True):
        assert np.all(np.isfinite(g)), variant


def test_contrastive_and_npair_check_grads():
    x, y = _random_batch(7)
    with jax.enable_x64(True):
        x64 = jnp.asarray(x, jnp.float64)
        check_grads(
            jax.jit(lambda x: contrastive_loss(x, y, margin=3.0)),
            (x64,),
            order=1,
            modes=("rev",),
            eps=1e-6,
        )
        check_grads(
            jax.jit(lambda a, p: npair_loss(a, p).sum()),
            (x64[:6], x64[6:]),
            order=1,
            modes=("rev",),
            eps=1e-6,
        )


# ------------------------------------------------------------------------------
# Properties.


@settings(max_examples=12, deadline=None)
@given(
    st.lists(st.integers(-8, 8), min_size=B * 3, max_size=B * 3),
    st.lists(st.integers(0, 3), min_size=B, max_size=B),
    st.permutations(list(range(B))),
    st.sampled_from([(m, s) for m in MININGS for s in (False, True)]),
)
def test_triplet_nonnegative_and_permutation_invariant(values, labels, perm, config):
    mining, soft = config
    x = np.asarray(values, np.float32).reshape(B, 3) / 4  # exact grid: no fake ties
    y = np.asarray(labels)
    x = np.concatenate([x, np.zeros((B, D - 3), np.float32)], axis=1)
    loss = float(_triplet(x, y, mining=mining, soft=soft)[0])
    permuted = float(_triplet(x[perm], y[perm], mining=mining, soft=soft)[0])
    assert loss >= 0
    np.testing.assert_allclose(loss, permuted, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------
# Contrastive and n-pair.


@pytest.mark.parametrize("metric", METRICS)
def test_contrastive_matches_reference(metric):
    f = jax.jit(
        jax.value_and_grad(
            lambda x, y: contrastive_loss(x, y, metric=metric, margin=1.5)
        )
    )
    for name, make in BATCHES.items():
        x, y = make()
        got, g = f(x, y)
        np.testing.assert_allclose(
            got,
            ref.contrastive(x, y, margin=1.5, metric=metric),
            rtol=2e-5,
            atol=2e-6,
            err_msg=name,
        )
        assert np.all(np.isfinite(g)), name


def test_contrastive_where_equals_slicing():
    x, y = _random_batch(8)
    w = np.arange(B) % 3 != 0
    x_pad = np.where(w[:, None], x, np.nan).astype(np.float32)
    np.testing.assert_allclose(
        contrastive_loss(x_pad, y, where=w), contrastive_loss(x[w], y[w]), rtol=1e-5
    )
    g = jax.jit(jax.grad(lambda x: contrastive_loss(x, y, where=w)))(x_pad)
    assert np.all(np.asarray(g)[~w] == 0) and np.all(np.isfinite(g))
    assert float(contrastive_loss(x[:1], y[:1])) == 0.0


def test_npair_matches_reference_and_where():
    rng = np.random.default_rng(9)
    a, p = rng.normal(size=(2, 7, 4)).astype(np.float32)
    np.testing.assert_allclose(npair_loss(a, p), ref.npair(a, p), rtol=1e-5)
    w = np.array([1, 1, 0, 1, 0, 1, 1], bool)
    a_pad = np.where(w[:, None], a, np.nan).astype(np.float32)
    got = npair_loss(a_pad, p, where=w)
    np.testing.assert_allclose(np.asarray(got)[w], ref.npair(a[w], p[w]), rtol=1e-5)
    assert np.all(np.asarray(got)[~w] == 0)
    ga, gp = jax.jit(jax.grad(lambda a, p: npair_loss(a, p, where=w).sum(), (0, 1)))(
        a_pad, p
    )
    assert np.all(np.asarray(ga)[~w] == 0) and np.all(np.asarray(gp)[~w] == 0)
    assert np.all(np.isfinite(ga)) and np.all(np.isfinite(gp))
    # All rows padded: zeros, finite gradient.
    none = np.zeros(7, bool)
    g = jax.jit(jax.grad(lambda a: npair_loss(a, p, where=none).sum()))(a)
    assert np.all(np.asarray(g) == 0)


# ------------------------------------------------------------------------------
# Two-head regulariser (Taha et al.).


def test_two_head_value():
    rng = np.random.default_rng(10)
    logits = rng.normal(size=(B, 4)).astype(np.float32)
    x, y = _random_batch(10)
    x_hat = x / np.linalg.norm(x, axis=1, keepdims=True)
    ce = np.mean(
        [
            np.log(np.exp(logits[i].astype(np.float64)).sum()) - logits[i, y[i]]
            for i in range(B)
        ]
    )
    expected = ce + 0.7 * ref.triplet_semi_hard(x_hat, y, margin=0.2)
    w = np.arange(B) != 3
    f = jax.jit(functools.partial(two_head_loss, lambda_=0.7))
    np.testing.assert_allclose(f(logits, x, y), expected, rtol=1e-5)
    np.testing.assert_allclose(
        f(logits, x, y, where=w), f(logits[w], x[w], y[w]), rtol=1e-5
    )


def test_two_head_in_one_jitted_step():
    # Backbone -> (classifier head GAP -> FC(C), embedding head FC(D) -> L2 norm).
    rng = np.random.default_rng(11)
    c, d_in, d_emb = 8, 6, 16
    params = {
        "backbone": jnp.asarray(rng.normal(size=(d_in, 10)) * 0.3, jnp.float32),
        "cls": jnp.asarray(rng.normal(size=(10, c)) * 0.3, jnp.float32),
        "emb": jnp.asarray(rng.normal(size=(10, d_emb)) * 0.3, jnp.float32),
    }
    images = jnp.asarray(rng.normal(size=(32, d_in)), jnp.float32)
    labels = jnp.repeat(jnp.arange(8), 4)  # P x K = 8 classes x 4 images
    tx = optax.sgd(0.1)

    @jax.jit
    def step(params, opt_state, images, labels):
        def loss_fn(params):
            h = jnp.tanh(images @ params["backbone"])
            return two_head_loss(h @ params["cls"], h @ params["emb"], labels)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    opt_state = tx.init(params)
    losses = []
    for _ in range(5):
        params, opt_state, loss, grads = step(params, opt_state, images, labels)
        losses.append(float(loss))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert all(float(jnp.abs(g).sum()) > 0 for g in grads.values())


# ------------------------------------------------------------------------------
# axis_name: 8 fake devices, pmap and shard_map, value and gradient.

NDEV = 8
LOCAL = 3


def _sharded_batch(seed=12):
    rng = np.random.default_rng(seed)
    n = NDEV * LOCAL
    x = rng.normal(size=(n, D)).astype(np.float32)
    y = rng.integers(0, 6, n)
    w = rng.random(n) > 0.15
    return x, y, w


def _single(fn, x, y, w):
    return jax.jit(jax.value_and_grad(lambda x: fn(x, y, w, None)))(x)


def _check_replicas(values, grads, loss, grad):
    np.testing.assert_allclose(
        np.asarray(values).ravel(), np.full(NDEV, loss), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(
        np.asarray(grads).reshape(-1, D), grad, rtol=1e-4, atol=1e-6
    )


def _triplet_fn(mining):
    def fn(x, y, w, axis_name):
        return triplet_loss(x, y, mining=mining, where=w, axis_name=axis_name)

    return fn


def _contrastive_fn(x, y, w, axis_name):
    return contrastive_loss(x, y, where=w, axis_name=axis_name)


def _two_head_fn(x, y, w, axis_name):
    logits = x[:, :4] * 2.0
    return two_head_loss(logits, x, y % 4, where=w, axis_name=axis_name)


PMAP_FNS = {
    "semi_hard": _triplet_fn("semi_hard"),
    "batch_hard": _triplet_fn("batch_hard"),
    "batch_all": _triplet_fn("batch_all"),
    "contrastive": _contrastive_fn,
    "two_head": _two_head_fn,
}


@pytest.mark.parametrize("name", PMAP_FNS)
def test_axis_name_pmap(name):
    assert jax.device_count() == NDEV
    fn = PMAP_FNS[name]
    x, y, w = _sharded_batch()
    loss, grad = _single(fn, x, y, w)
    shape = (NDEV, LOCAL)
    values, grads = jax.pmap(
        jax.value_and_grad(lambda x, y, w: fn(x, y, w, "i")), axis_name="i"
    )(x.reshape(*shape, D), y.reshape(shape), w.reshape(shape))
    _check_replicas(values, grads, loss, grad)


def test_axis_name_shard_map():
    fn = PMAP_FNS["semi_hard"]
    x, y, w = _sharded_batch(13)
    loss, grad = _single(fn, x, y, w)
    mesh = jax.make_mesh((NDEV,), ("i",))
    xs, ys, ws = (jax.device_put(a, NamedSharding(mesh, P("i"))) for a in (x, y, w))
    # Gradient taken inside the map (check_vma on and off) ...
    for check_vma in (True, False):
        inner = jax.shard_map(
            jax.value_and_grad(lambda x, y, w: fn(x, y, w, "i")),
            mesh=mesh,
            in_specs=P("i"),
            out_specs=(P(), P("i")),
            check_vma=check_vma,
        )
        value, grads = jax.jit(inner)(xs, ys, ws)
        _check_replicas(np.full(NDEV, value), grads, loss, grad)
    # ... and outside it, on a replicated scalar.
    with jax.set_mesh(mesh):
        outer = jax.shard_map(
            lambda x, y, w: fn(x, y, w, "i"), mesh=mesh, in_specs=P("i"), out_specs=P()
        )
        value, grads = jax.jit(jax.value_and_grad(outer))(xs, ys, ws)
    _check_replicas(np.full(NDEV, value), grads, loss, grad)


# ------------------------------------------------------------------------------
# Errors.


def _raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def test_errors():
    x, y = _random_batch()
    _raises(
        ValueError, r"`embeddings` must have rank 2.*\(12,\)", triplet_loss, x[:, 0], y
    )
    _raises(
        ValueError,
        r"`labels` must have shape \[B\] = \(12,\).*\(11,\)",
        triplet_loss,
        x,
        y[:11],
    )
    _raises(
        TypeError,
        r"`labels` must be an integer array.*float",
        triplet_loss,
        x,
        y.astype(np.float32),
    )
    _raises(
        TypeError,
        r"`embeddings` must be a floating-point.*int",
        triplet_loss,
        y.reshape(3, 4),
        y[:3],
    )
    _raises(
        ValueError,
        r"`mining` must be one of 'semi_hard', 'batch_hard', "
        r"'batch_all'; got 'hard'",
        triplet_loss,
        x,
        y,
        mining="hard",
    )
    _raises(
        ValueError,
        r"`metric` must be one of 'squared_l2', 'l2', 'cosine'; got "
        r"'euclidean'",
        triplet_loss,
        x,
        y,
        metric="euclidean",
    )
    _raises(
        ValueError, r"pairwise_distances: `metric`", pairwise_distances, x, metric="L_2"
    )
    _raises(
        TypeError, r"`where` must be a boolean", triplet_loss, x, y, where=np.ones(B)
    )
    _raises(
        ValueError,
        r"`where` must have shape",
        triplet_loss,
        x,
        y,
        where=np.ones(B - 1, bool),
    )
    _raises(
        TypeError,
        r"`soft` must be a Python bool",
        triplet_loss,
        x,
        y,
        soft=jnp.array(True),
    )
    _raises(
        ValueError, r"contrastive_loss: `metric`", contrastive_loss, x, y, metric="dot"
    )
    _raises(ValueError, r"contrastive_loss: `labels`", contrastive_loss, x, y[:3])
    _raises(
        ValueError,
        r"`anchors` and `positives` must have the same shape.*"
        r"\(12, 5\).*\(11, 5\)",
        npair_loss,
        x,
        x[:11],
    )
    _raises(
        TypeError,
        r"npair_loss: `positives` must be a floating",
        npair_loss,
        x,
        y.reshape(12, 1).repeat(5, 1),
    )
    _raises(ValueError, r"`distances` must be square.*\(12, 5\)", mine_semi_hard, x, y)
    _raises(
        ValueError,
        r"mine_batch_hard: `labels`",
        mine_batch_hard,
        np.zeros((12, 12), np.float32),
        y[:4],
    )
    _raises(
        ValueError,
        r"mine_batch_all: `labels` must have rank 1",
        mine_batch_all,
        y.reshape(3, 4),
    )
    logits = np.zeros((B, 3), np.float32)
    _raises(ValueError, r"`labels` must lie in \[0, 3\)", two_head_loss, logits, x, y)
    _raises(
        ValueError,
        r"`class_logits` and `embeddings` must have the same batch",
        two_head_loss,
        logits[:5],
        x,
        y,
    )
    # Padding labels outside [0, C) are fine when their rows are masked out.
    w = y < 3
    assert np.isfinite(two_head_loss(logits, x, y, where=w))


def test_docstring_examples():
    result = doctest.testmod(pairs, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 10


@pytest.mark.parametrize("module", ["batch", "collective", "distances", "mining"])
def test_plumbing_docstring_examples(module):
    # The distances and miners moved out of pairs (re-exported there, so
    # doctest.testmod(pairs) no longer runs their examples).
    mod = importlib.import_module(f"margin_jax.{module}")
    result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


def test_moved_names_are_reexported():
    import margin_jax as mj
    from margin_jax import distances, mining

    for name in ("pairwise_distances", "positive_mask", "negative_mask", "METRICS"):
        assert getattr(pairs, name) is getattr(distances, name) is not None
    for name in ("mine_semi_hard", "mine_batch_hard", "mine_batch_all", "MININGS"):
        assert getattr(pairs, name) is getattr(mining, name)
    assert mj.pairs.METRICS == METRICS and mj.pairs.MININGS == MININGS
    assert mj.pairwise_distances is distances.pairwise_distances
