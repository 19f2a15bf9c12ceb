"""Tests for kNN search, Recall@K, MAP@R / R-precision, NMI and macro accuracy."""

import numpy as np
import pytest

from margin_jax.eval import (
    knn_search,
    macro_accuracy,
    nmi,
    recall_at_k,
    retrieval_metrics,
)

# --------------------------------------------------------------------------- #
# Brute-force references: full matrices, stable sorts, Python loops.
# --------------------------------------------------------------------------- #


def _ref_neighbours(x, metric="cosine", gallery=None):
    """Neighbour order of every query: full score matrix, stable by index."""
    self_search = gallery is None
    g = x if self_search else gallery
    if metric == "cosine":
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        gn = g / np.linalg.norm(g, axis=1, keepdims=True)
        key = -(xn @ gn.T)
    else:
        key = ((x[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    order = []
    for i in range(len(x)):
        row = np.argsort(key[i], kind="stable")
        order.append(row[row != i] if self_search else row)
    return np.array(order), key


def _ref_recall(x, y, ks, metric="cosine"):
    order, _ = _ref_neighbours(x, metric)
    out = {}
    lone = np.array([np.sum(y == c) == 1 for c in y])
    for k in ks:
        hits = [np.any(y[order[i, :k]] == y[i]) for i in range(len(y)) if not lone[i]]
        out[f"recall@{k}"] = float(np.mean(hits))
    return out


def _ref_map_at_r(x, y, metric="cosine"):
    """Musgrave et al.'s definitions, one query at a time."""
    order, _ = _ref_neighbours(x, metric)
    p1, rp, ap = [], [], []
    for i in range(len(y)):
        r = int(np.sum(y == y[i])) - 1
        if r == 0:
            continue
        rel = y[order[i, :r]] == y[i]
        p1.append(float(y[order[i, 0]] == y[i]))
        rp.append(rel.sum() / r)
        ap.append(sum(rel[j] * rel[: j + 1].sum() / (j + 1) for j in range(r)) / r)
    return np.mean(p1), np.mean(rp), np.mean(ap)


def _clustered(n_classes=30, per_class=6, d=16, noise=0.8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, d))
    y = np.repeat(np.arange(n_classes), per_class)
    x = centres[y] + noise * rng.normal(size=(len(y), d))
    perm = rng.permutation(len(y))
    return x[perm].astype(np.float32), y[perm]


# --------------------------------------------------------------------------- #
# knn_search
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("block_size", [None, 7, 64])
def test_knn_search_matches_brute_force(metric, block_size):
    x, _ = _clustered(n_classes=10, per_class=5)  # 50 rows: 7 does not divide it
    scores, idx = knn_search(x, k=6, metric=metric, block_size=block_size)
    order, key = _ref_neighbours(x.astype(np.float64), metric)
    np.testing.assert_array_equal(idx, order[:, :6])
    ref_scores = np.take_along_axis(key, order[:, :6], axis=1)
    ref_scores = -ref_scores if metric == "cosine" else ref_scores
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-4)


def test_knn_search_separate_gallery():
    x, _ = _clustered(n_classes=5, per_class=4)
    g, _ = _clustered(n_classes=7, per_class=3, seed=1)
    _, idx = knn_search(x, g, k=21, block_size=3)
    order, _ = _ref_neighbours(x.astype(np.float64), gallery=g.astype(np.float64))
    np.testing.assert_array_equal(idx, order)


def test_knn_search_ties_go_to_the_lower_index():
    # One-hot rows: every similarity is exactly 0 or 1 (and 0 * -1 = -0.0 for
    # the last row, which must tie with +0.0).
    x = np.array(
        [[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1], [1, 0, 0], [0, -1, 0]],
        dtype=np.float32,
    )
    _, idx = knn_search(x, k=5)
    assert idx[0].tolist() == [2, 4, 1, 3, 5]  # the duplicates first, by index
    assert idx[2].tolist() == [0, 4, 1, 3, 5]  # itself excluded, not its twin
    assert idx[3].tolist() == [0, 1, 2, 4, 5]  # all zero: pure index order
    _, idx = knn_search(x, k=5, metric="euclidean")
    assert idx[0].tolist() == [2, 4, 1, 3, 5]


def test_knn_search_errors():
    x = np.random.default_rng(0).normal(size=(5, 3))
    with pytest.raises(ValueError, match=r"`k` must be an integer in \[1, 4\]"):
        knn_search(x, k=5)
    assert knn_search(x, x, k=5)[1].shape == (5, 5)  # separate gallery: 5 items
    with pytest.raises(ValueError, match="same dimension"):
        knn_search(x, x[:, :2], k=1)
    with pytest.raises(ValueError, match="metric"):
        knn_search(x, k=1, metric="manhattan")
    with pytest.raises(ValueError, match="block_size"):
        knn_search(x, k=1, block_size=0)


# --------------------------------------------------------------------------- #
# Recall@K
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_recall_at_k_matches_brute_force(metric):
    x, y = _clustered()
    y = y.copy()
    y[:3] = [100, 101, 102]  # three lone queries
    got = recall_at_k(x, y, ks=(1, 2, 4, 8), metric=metric, block_size=16)
    ref = _ref_recall(x.astype(np.float64), y, (1, 2, 4, 8), metric)
    for k in (1, 2, 4, 8):
        assert got[f"recall@{k}"] == pytest.approx(ref[f"recall@{k}"], abs=1e-12)
    assert got["num_lone_queries"] == 3 and got["num_queries"] == len(y) - 3
    assert 0.2 < got["recall@1"] < got["recall@8"] < 1.0


def test_recall_at_k_hand_example():
    # Unit vectors at 0, 10, 21 and 90 degrees; classes a a b b.
    ang = np.deg2rad([0.0, 10.0, 21.0, 90.0])
    x = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    y = np.array(["a", "a", "b", "b"])
    out = recall_at_k(x, y, ks=(1, 2, 3))
    # q0: 1(a) hit. q1: 0(a) hit. q2: 1(a), 0(a), 3(b): first hit at 3.
    # q3: 2(b) hit.
    assert out == {
        "recall@1": 0.75,
        "recall@2": 0.75,
        "recall@3": 1.0,
        "num_queries": 4,
        "num_lone_queries": 0,
    }


def test_recall_at_k_errors_and_documented_values():
    x, y = _clustered(n_classes=2, per_class=3)
    with pytest.raises(
        ValueError, match=r"every K in `ks` must be an integer in \[1, 5\]"
    ):
        recall_at_k(x, y, ks=(1, 6))
    with pytest.raises(ValueError, match="ks"):
        recall_at_k(x, y, ks=(0,))
    with pytest.raises(ValueError, match=r"`labels` must have shape \[N\] = \(6,\)"):
        recall_at_k(x, y[:5])
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(
        ValueError, match=r"`embeddings` of shape \(6, 16\) contains NaN"
    ):
        recall_at_k(bad, y)
    with pytest.raises(ValueError, match="rank 2"):
        recall_at_k(x[0], y)
    with pytest.raises(ValueError, match="at least 2 items"):
        recall_at_k(x[:1], y[:1], ks=(1,))
    # A single class: every neighbour is correct.
    assert recall_at_k(x, np.zeros(6, int), ks=(1,))["recall@1"] == 1.0
    # Every query lone: nothing to score.
    out = recall_at_k(x, np.arange(6), ks=(1,))
    assert np.isnan(out["recall@1"]) and out["num_lone_queries"] == 6


# --------------------------------------------------------------------------- #
# precision@1, R-precision, MAP@R
# --------------------------------------------------------------------------- #


def test_map_at_r_hand_example_with_lone_query_and_ties():
    # One-hot rows, so all similarities are exactly 0 or 1 and ties are broken
    # by index. Labels: 0 0 0 1 1 2(lone).
    x = np.array(
        [
            [1, 0, 0, 0],  # 0, class 0
            [0, 1, 0, 0],  # 1, class 0
            [1, 0, 0, 0],  # 2, class 0
            [1, 0, 0, 0],  # 3, class 1
            [0, 0, 1, 0],  # 4, class 1
            [0, 0, 0, 1],  # 5, class 2 (lone)
        ],
        dtype=np.float32,
    )
    y = np.array([0, 0, 0, 1, 1, 2])
    # Neighbour lists (similarity 1 first, then the zeros by index):
    #   q0 (R=2): 2, 3 | 1 4 5      rel 1 0  -> RP 1/2, AP (1/1)/2     = 1/2
    #   q1 (R=2): 0, 2 | 3 4 5      rel 1 1  -> RP 1,   AP (1 + 2/2)/2 = 1
    #   q2 (R=2): 0, 3 | 1 4 5      rel 1 0  -> RP 1/2, AP 1/2
    #   q3 (R=1): 0 | ...           rel 0    -> RP 0,   AP 0
    #   q4 (R=1): 0 | ...           rel 0    -> RP 0,   AP 0
    #   q5: lone, excluded.
    # precision@1: q0 1, q1 1, q2 1, q3 0, q4 0 -> 3/5.
    out = retrieval_metrics(x, y)
    assert out["precision_at_1"] == pytest.approx(3 / 5)
    assert out["r_precision"] == pytest.approx((0.5 + 1 + 0.5 + 0 + 0) / 5)
    assert out["map_at_r"] == pytest.approx((0.5 + 1 + 0.5 + 0 + 0) / 5)
    assert out["num_queries"] == 5 and out["num_lone_queries"] == 1


def test_map_at_r_differs_from_r_precision_by_rank():
    # q0 (class 0, R = 2) sees: wrong, right, right. R-precision counts the
    # first R = 2 (1 right); AP@R = (0 + 1/2) / 2 = 1/4.
    ang = np.deg2rad([0.0, 20.0, 25.0, 10.0])
    x = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    y = np.array([0, 0, 0, 1])
    out = retrieval_metrics(x, y)
    ref = _ref_map_at_r(x, y)
    np.testing.assert_allclose(
        [out["precision_at_1"], out["r_precision"], out["map_at_r"]], ref
    )
    # Query 0's own contribution, from the comment above:
    order, _ = _ref_neighbours(x)
    assert order[0].tolist() == [3, 1, 2]


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_retrieval_metrics_match_brute_force(metric):
    x, y = _clustered(n_classes=12, per_class=5)
    y = y.copy()
    y[:7] = np.arange(7) % 3 + 50  # uneven class sizes
    y[7] = 99  # a lone query
    got = retrieval_metrics(x, y, metric=metric, block_size=9)
    ref = _ref_map_at_r(x.astype(np.float64), y, metric)
    np.testing.assert_allclose(
        [got["precision_at_1"], got["r_precision"], got["map_at_r"]], ref, rtol=1e-12
    )
    assert got["num_lone_queries"] == 1


@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_metrics_match_pytorch_metric_learning(seed):
    import torch
    from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 25, size=300)
    y[:2] = [1000, 1001]  # lone queries, excluded by both
    x = (rng.normal(size=(25, 12))[y % 25] + 1.2 * rng.normal(size=(300, 12))).astype(
        np.float32
    )
    include = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
    for metric, distance in [
        ("cosine", CosineSimilarity()),
        ("euclidean", LpDistance(normalize_embeddings=False)),
    ]:
        calc = AccuracyCalculator(
            include=include,
            k="max_bin_count",
            knn_func=CustomKNN(distance),
            device=torch.device("cpu"),
        )
        ref = calc.get_accuracy(x, y)
        got = retrieval_metrics(x, y, metric=metric)
        assert got["precision_at_1"] == pytest.approx(ref["precision_at_1"], abs=1e-9)
        assert got["r_precision"] == pytest.approx(ref["r_precision"], abs=1e-9)
        assert got["map_at_r"] == pytest.approx(
            ref["mean_average_precision_at_r"], abs=1e-9
        )
    # Recall@1 excludes lone queries too, so it equals precision@1.
    recall = recall_at_k(x, y, ks=(1,), metric="euclidean")["recall@1"]
    assert recall == pytest.approx(got["precision_at_1"])


def test_retrieval_metrics_documented_values():
    x, _ = _clustered(n_classes=2, per_class=3)
    single = retrieval_metrics(x, np.zeros(6, int))
    assert single["precision_at_1"] == single["r_precision"] == single["map_at_r"] == 1
    lone = retrieval_metrics(x, np.arange(6))
    assert np.isnan(lone["map_at_r"]) and lone["num_queries"] == 0
    with pytest.raises(ValueError, match="`labels` must have shape"):
        retrieval_metrics(x, np.zeros(7, int))
    bad = x.copy()
    bad[1, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        retrieval_metrics(bad, np.zeros(6, int))


# --------------------------------------------------------------------------- #
# NMI and macro accuracy
# --------------------------------------------------------------------------- #


def test_nmi_matches_sklearn_kmeans_and_nmi():
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    x, y = _clustered(n_classes=8, per_class=10, noise=1.5)
    got = nmi(x, y, seed=3)
    xn = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1)[:, None]
    clusters = KMeans(n_clusters=8, random_state=3, n_init=10).fit_predict(xn)
    ref = normalized_mutual_info_score(y, clusters, average_method="arithmetic")
    assert got == pytest.approx(ref, abs=1e-12)
    assert 0.2 < got < 1.0
    assert KMeans is not None
    # Well separated classes are recovered exactly, whatever the label names.
    sep, ys = _clustered(n_classes=4, per_class=8, noise=0.01)
    assert nmi(sep, np.array(["w", "x", "y", "z"])[ys]) == pytest.approx(1.0)


def test_nmi_errors():
    x, y = _clustered(n_classes=3, per_class=3)
    with pytest.raises(ValueError, match="at least 2 classes"):
        nmi(x, np.zeros(9, int))
    with pytest.raises(ValueError, match="`labels` must have shape"):
        nmi(x, y[:-1])
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        nmi(bad, y)


def test_missing_optional_dependency_says_how_to_install(monkeypatch):
    import sys

    x, y = _clustered(n_classes=3, per_class=3)
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    with pytest.raises(ImportError, match=r"pip install margin-jax\[eval\]"):
        nmi(x, y)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_macro_accuracy_matches_sklearn_balanced_accuracy():
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 7, size=500)
    y[:50] = 0  # imbalanced
    p = np.where(rng.random(500) < 0.6, y, rng.integers(0, 9, size=500))  # 7, 8 unseen
    assert macro_accuracy(p, y) == pytest.approx(balanced_accuracy_score(y, p))
    logits = rng.normal(size=(500, 9))
    assert macro_accuracy(logits, y) == pytest.approx(
        balanced_accuracy_score(y, logits.argmax(-1))
    )
    # Hand example: class 0 recall 2/3, class 1 recall 1 -> 5/6 (plain: 3/4).
    assert macro_accuracy(np.array([0, 0, 1, 1]), np.array([0, 0, 0, 1])) == (
        pytest.approx(5 / 6)
    )


def test_macro_accuracy_errors():
    with pytest.raises(ValueError, match="same length"):
        macro_accuracy(np.array([0, 1]), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="`predictions` must be integer"):
        macro_accuracy(np.array([0.0, 1.0]), np.array([0, 1]))
    with pytest.raises(ValueError, match="`labels` must be a non-empty integer"):
        macro_accuracy(np.array([0, 1]), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="NaN"):
        macro_accuracy(np.array([[0.0, np.nan]]), np.array([0]))


# --------------------------------------------------------------------------- #
# Invariants
# --------------------------------------------------------------------------- #

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_metrics_ignore_row_scale_and_item_order(seed):
    # Fixed shapes, so the kNN step compiles once for all examples.
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 6, size=24)
    x = rng.normal(size=(24, 4)) + 2 * np.eye(6, 4)[y]
    base = retrieval_metrics(x, y)
    base.update(recall_at_k(x, y, ks=(1, 3)))
    perm = rng.permutation(24)
    scaled = x * rng.uniform(0.1, 10.0, size=(24, 1))
    for xs, ys in [(scaled, y), (x[perm], y[perm])]:
        other = retrieval_metrics(xs, ys)
        other.update(recall_at_k(xs, ys, ks=(1, 3)))
        for key, value in base.items():
            assert other[key] == pytest.approx(value, abs=1e-12), key


def test_knn_search_progress_bar_does_not_change_results(capsys):
    x, _ = _clustered(n_classes=4, per_class=5)
    plain = knn_search(x, k=3, block_size=4)
    shown = knn_search(x, k=3, block_size=4, progress=True)
    np.testing.assert_array_equal(plain[1], shown[1])
