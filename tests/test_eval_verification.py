"""Tests for margin_jax.eval.verification: LFW k-fold protocol, ROC, TAR@FAR."""

import numpy as np
import pytest

from margin_jax.eval import (
    flip_fused_embeddings,
    pair_similarity,
    roc_curve,
    split_pairs,
    tar_at_far,
    val_at_far,
    verification_accuracy,
)
from margin_jax.eval.verification import _folds, _interp_threshold

sklearn_metrics = pytest.importorskip("sklearn.metrics")
from sklearn.model_selection import KFold  # noqa: E402
from sklearn.preprocessing import normalize  # noqa: E402

# --------------------------------------------------------------------------- #
# A loop reference of insightface's evaluate(): one threshold at a time, as its
# calculate_roc / calculate_val do (our implementation counts with searchsorted).
# --------------------------------------------------------------------------- #


def _ref_rates(t, dist, same):
    pred = dist < t
    tp = np.sum(pred & same)
    fp = np.sum(pred & ~same)
    tn = np.sum(~pred & ~same)
    fn = np.sum(~pred & same)
    tpr = 0 if tp + fn == 0 else tp / (tp + fn)
    fpr = 0 if fp + tn == 0 else fp / (fp + tn)
    return tpr, fpr, (tp + tn) / dist.size


def _ref_old_scipy_slinear(x, y, v):
    """interp1d(x, y, kind='slinear')(v) as SciPy <= 1.8 evaluated it.

    Its k=1 spline is the B-spline with knots [x0, x0, x1, ..., xn, xn] and
    coefficients y; modern BSpline evaluates that without the duplicate check.
    """
    from scipy.interpolate import BSpline

    spline = BSpline.construct_fast(np.r_[x[0], x, x[-1]], np.asarray(y, float), 1)
    return float(spline(v))


def _ref_evaluate(emb1, emb2, same, n_folds=10, far_target=1e-3):
    e1, e2 = normalize(emb1), normalize(emb2)
    dist = np.sum(np.square(e1 - e2), 1)
    thresholds = np.arange(0, 4, 0.01)
    kfold = KFold(n_splits=n_folds, shuffle=False)
    accuracy, best, tprs, fprs = [], [], [], []
    val, far = [], []
    for train, test in kfold.split(np.arange(same.size)):
        acc_train = [_ref_rates(t, dist[train], same[train])[2] for t in thresholds]
        b = int(np.argmax(acc_train))
        rates = [_ref_rates(t, dist[test], same[test]) for t in thresholds]
        tprs.append([r[0] for r in rates])
        fprs.append([r[1] for r in rates])
        accuracy.append(_ref_rates(thresholds[b], dist[test], same[test])[2])
        best.append(thresholds[b])
        vt = np.arange(0, 4, 0.001)
        neg = dist[train][~same[train]]
        far_train = np.array([np.sum(neg < t) / neg.size for t in vt])
        if far_train.max() >= far_target:
            t = _ref_old_scipy_slinear(far_train, vt, far_target)
        else:
            t = 0.0
        d, s = dist[test], same[test]
        val.append(np.sum((d < t) & s) / s.sum())
        far.append(np.sum((d < t) & ~s) / (~s).sum())
    return dict(
        accuracy=np.array(accuracy),
        best_thresholds=np.array(best),
        tpr=np.mean(tprs, 0),
        fpr=np.mean(fprs, 0),
        val_folds=np.array(val),
        far_folds=np.array(far),
        distances=dist,
    )


def _pairs(n=600, d=32, noise=0.9, seed=0):
    rng = np.random.default_rng(seed)
    e1 = rng.normal(size=(n, d))
    same = rng.random(n) < 0.5
    e2 = np.where(
        same[:, None], e1 + noise * rng.normal(size=(n, d)), rng.normal(size=(n, d))
    )
    return e1, e2, same


@pytest.mark.parametrize("n,n_folds", [(600, 10), (613, 10), (97, 5)])
def test_verification_matches_insightface_loop_reference(n, n_folds):
    e1, e2, same = _pairs(n=n, seed=n)
    got = verification_accuracy(e1, e2, same, n_folds=n_folds)
    ref = _ref_evaluate(e1, e2, same, n_folds=n_folds)
    np.testing.assert_allclose(got["distances"], ref["distances"], rtol=1e-12)
    np.testing.assert_array_equal(got["accuracy"], ref["accuracy"])
    np.testing.assert_array_equal(got["best_thresholds"], ref["best_thresholds"])
    np.testing.assert_array_equal(got["tpr"], ref["tpr"])
    np.testing.assert_array_equal(got["fpr"], ref["fpr"])
    np.testing.assert_allclose(got["val_folds"], ref["val_folds"], rtol=1e-12)
    np.testing.assert_allclose(got["far_folds"], ref["far_folds"], rtol=1e-12)
    assert got["mean"] == np.mean(ref["accuracy"])
    assert got["std"] == np.std(ref["accuracy"])
    assert 0.6 < got["mean"] < 1.0  # the fixture is neither trivial nor random
    assert got["thresholds"].shape == got["tpr"].shape == (400,)
    assert got["val"] == np.mean(got["val_folds"])
    assert got["val_std"] == np.std(got["val_folds"])
    val = val_at_far(e1, e2, same, n_folds=n_folds)
    np.testing.assert_array_equal(val["val_folds"], got["val_folds"])


def test_folds_are_sklearn_kfold_without_shuffle():
    for n, k in [(6000, 10), (613, 10), (11, 3), (10, 10)]:
        ours = list(_folds(n, k))
        ref = list(KFold(n_splits=k, shuffle=False).split(np.arange(n)))
        assert len(ours) == len(ref)
        for (tr, te), (rtr, rte) in zip(ours, ref, strict=True):
            np.testing.assert_array_equal(tr, rtr)
            np.testing.assert_array_equal(te, rte)
    ((train, test),) = list(_folds(5, 1))  # insightface's LFold(1): train == test
    np.testing.assert_array_equal(train, test)


def test_threshold_ties_pick_the_first_best():
    # Distances 0.505 (genuine) and 2.5 (impostor): every threshold in
    # (0.505, 2.5] is perfect on the training folds; argmax picks the first, 0.51.
    e1 = np.tile([[1.0, 0.0]], (20, 1))
    genuine = np.array([0.7475, np.sqrt(1 - 0.7475**2)])  # d = 2 - 2c = 0.505
    impostor = np.array([-0.25, np.sqrt(1 - 0.0625)])  # d = 2.5
    same = np.arange(20) % 2 == 0
    e2 = np.where(same[:, None], genuine, impostor)
    out = verification_accuracy(e1, e2, same)
    np.testing.assert_allclose(out["best_thresholds"], 0.51)
    assert out["mean"] == 1.0 and out["std"] == 0.0


def test_interp_threshold_matches_old_scipy_with_repeated_far_values():
    rng = np.random.default_rng(3)
    for _ in range(20):
        far = np.sort(rng.integers(0, 6, size=40)) / 5.0  # long runs of ties
        far[0] = 0.0
        thresholds = np.arange(40) * 0.1
        for target in [0.0, 0.1, 0.2, 0.35, 0.4, 0.999 * far.max()]:
            got = _interp_threshold(far, thresholds, target)
            ref = _ref_old_scipy_slinear(far, thresholds, target)
            np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


def test_interp_threshold_matches_modern_scipy_without_ties():
    from scipy.interpolate import interp1d

    far = np.sort(np.random.default_rng(0).random(50))
    thresholds = np.linspace(0, 4, 50)
    for target in np.linspace(far[0], far[-1], 17):
        ref = float(interp1d(far, thresholds, kind="slinear")(target))
        np.testing.assert_allclose(_interp_threshold(far, thresholds, target), ref)


def test_val_falls_back_to_threshold_zero_when_far_is_unreachable():
    # Impostors are all far apart: FAR never reaches 0.5 on the grid < 4.
    e1 = np.tile([[1.0, 0.0]], (10, 1))
    same = np.arange(10) % 2 == 0
    e2 = np.where(same[:, None], [1.0, 0.0], [-1.0, 0.0])
    out = val_at_far(e1, e2, same, far_target=1.0, n_folds=2)
    np.testing.assert_array_equal(out["val_thresholds"], 0.0)
    assert out["val"] == 0.0 and out["far"] == 0.0


def test_fold_without_impostors_gives_nan_val():
    e1, e2, _ = _pairs(n=20)
    same = np.r_[np.ones(10, bool), np.zeros(10, bool)]
    out = verification_accuracy(e1, e2, same, n_folds=2)
    # Fold 1 trains on genuine pairs only: no FAR curve, VAL undefined. Fold 0
    # tests on genuine pairs only: its VAL exists, its FAR does not.
    assert np.isnan(out["val_folds"][1]) and np.isfinite(out["val_folds"][0])
    assert np.isnan(out["far_folds"]).all() and np.isnan(out["val"])
    assert np.isfinite(out["accuracy"]).all()


def test_flip_fused_embeddings_and_fixed_size_batches():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(11, 4, 5, 3)).astype(np.uint8)
    w = rng.normal(size=(4 * 5 * 3, 7))
    shapes = []

    def embed(x):
        shapes.append(x.shape[0])
        return np.asarray(x, np.float64).reshape(len(x), -1) @ w

    expected = embed(images) + embed(images[:, :, ::-1])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    shapes.clear()
    got = flip_fused_embeddings(embed, images, batch_size=4)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert set(shapes) == {4}  # the last batch overlaps instead of shrinking
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0)
    e1, e2 = split_pairs(np.arange(12).reshape(6, 2))
    np.testing.assert_array_equal(e1[:, 0], [0, 4, 8])
    np.testing.assert_array_equal(e2[:, 0], [2, 6, 10])
    with pytest.raises(ValueError, match="even number of rows"):
        split_pairs(np.zeros((5, 2)))


def test_pair_similarity_is_monotone_in_insightface_distance():
    e1, e2, same = _pairs(n=50)
    s = pair_similarity(e1, e2)
    d = verification_accuracy(e1, e2, same, n_folds=5)["distances"]
    np.testing.assert_allclose(d, 2 - 2 * s, atol=1e-12)


# --------------------------------------------------------------------------- #
# ROC and TAR@FAR
# --------------------------------------------------------------------------- #


def _ref_tar_at_far(scores, same, fars):
    """insightface's IJB rule on sklearn's roc_curve: flip, first minimum."""
    fpr, tpr, thr = sklearn_metrics.roc_curve(same, scores)
    fpr, tpr, thr = np.flipud(fpr), np.flipud(tpr), np.flipud(thr)
    out = []
    for f in fars:
        _, i = min(zip(np.abs(fpr - f), range(len(fpr)), strict=True))
        out.append((tpr[i], thr[i], fpr[i]))
    return np.array(out).T


@pytest.mark.parametrize("rounding", [None, 1, 2])
@pytest.mark.parametrize("drop", [True, False])
def test_roc_curve_equals_sklearn(rounding, drop):
    rng = np.random.default_rng(1)
    same = rng.random(3000) < 0.3
    scores = rng.normal(size=3000) + 1.5 * same
    if rounding is not None:  # many tied scores
        scores = np.round(scores, rounding)
    got = roc_curve(scores, same, drop_intermediate=drop)
    ref = sklearn_metrics.roc_curve(same, scores, drop_intermediate=drop)
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_array_equal(g, r)


@pytest.mark.parametrize("rounding", [None, 1])
def test_tar_at_far_matches_sklearn_with_insightface_selection(rounding):
    rng = np.random.default_rng(2)
    same = rng.random(20000) < 0.1
    scores = rng.normal(size=20000) + 2.5 * same
    if rounding is not None:
        scores = np.round(scores, rounding)
    fars = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 0.5)
    out = tar_at_far(scores, same, fars=fars)
    tar, thr, actual = _ref_tar_at_far(scores, same, fars)
    np.testing.assert_array_equal(out["tar"], tar)
    np.testing.assert_array_equal(out["threshold"], thr)
    np.testing.assert_array_equal(out["actual_far"], actual)
    np.testing.assert_array_equal(out["far"], fars)
    fpr, tpr, _ = sklearn_metrics.roc_curve(same, scores)
    np.testing.assert_allclose(out["auc"], sklearn_metrics.auc(fpr, tpr), rtol=1e-12)
    np.testing.assert_allclose(out["auc"], sklearn_metrics.roc_auc_score(same, scores))


def test_tar_at_far_hand_example():
    # Sorted by score: G G I G I I. ROC points (FPR, TPR): (0,0) (0,1/3) (0,2/3)
    # (1/3,2/3) (1/3,1) (1,1) after dropping collinear points.
    scores = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    same = np.array([True, True, False, True, False, False])
    out = tar_at_far(scores, same, fars=(0.0, 0.3, 0.9))
    np.testing.assert_allclose(out["tar"], [2 / 3, 1.0, 1.0])  # largest TPR on ties
    np.testing.assert_allclose(out["actual_far"], [0.0, 1 / 3, 1.0])
    np.testing.assert_allclose(out["threshold"], [0.8, 0.3, 0.1])
    # The threshold reproduces the TAR: accept when score >= threshold.
    for tar, t in zip(out["tar"], out["threshold"], strict=True):
        assert np.mean(scores[same] >= t) == tar


# --------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------- #


def test_verification_bad_input():
    e1, e2, same = _pairs(n=40)
    with pytest.raises(ValueError, match=r"`emb1` and `emb2`.*\(40, 32\).*\(39, 32\)"):
        verification_accuracy(e1, e2[:-1], same)
    with pytest.raises(ValueError, match=r"`issame` must have shape.*\(39,\)"):
        verification_accuracy(e1, e2, same[:-1])
    bad = e1.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"`emb1` of shape \(40, 32\) contains NaN"):
        verification_accuracy(bad, e2, same)
    bad[3, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        verification_accuracy(e1, bad, same)
    with pytest.raises(ValueError, match=r"`emb1` must have rank 2.*\(40,\)"):
        verification_accuracy(e1[:, 0], e2, same)
    with pytest.raises(ValueError, match="both genuine"):
        verification_accuracy(e1, e2, np.ones(40, bool))
    with pytest.raises(ValueError, match="n_folds"):
        verification_accuracy(e1, e2, same, n_folds=41)
    with pytest.raises(ValueError, match="far_target"):
        val_at_far(e1, e2, same, far_target=1.5)
    with pytest.raises(TypeError, match="`issame` must be boolean"):
        verification_accuracy(e1, e2, np.full(40, 0.5))


def test_tar_at_far_bad_input():
    scores, same = np.arange(10.0), np.arange(10) % 2 == 0
    with pytest.raises(ValueError, match=r"`issame` must have shape \[P\] = \(10,\)"):
        tar_at_far(scores, same[:9])
    with pytest.raises(ValueError, match="NaN"):
        tar_at_far(np.r_[scores[:9], np.nan], same)
    with pytest.raises(ValueError, match="both genuine"):
        tar_at_far(scores, np.zeros(10, bool))
    with pytest.raises(ValueError, match="rank 1"):
        tar_at_far(scores[None], same)
    with pytest.raises(ValueError, match="fars"):
        tar_at_far(scores, same, fars=(2.0,))
