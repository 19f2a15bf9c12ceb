"""Pair verification: LFW-style k-fold accuracy, VAL@FAR, ROC and TAR@FAR.

Two protocols live here. `verification_accuracy` is the small-benchmark protocol
(LFW, CFP-FP, AgeDB-30: a few thousand pairs, 10 folds, a distance threshold
picked on nine folds and tested on the tenth), computed exactly as insightface's
``eval/verification.py`` computes it, quirks included; every quirk is named in
the docstrings. `tar_at_far` is the large-scale protocol (IJB-B/C: millions of
pairs, one ROC, TAR read at fixed FARs), as insightface's IJB scripts read it
off ``sklearn.metrics.roc_curve``.

Everything is NumPy float64: these are a few thousand to a few million scalars,
and matching the reference implementations bit for bit matters more than speed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from margin_jax.eval import _checks

__all__ = [
    "ACCURACY_THRESHOLDS",
    "VAL_THRESHOLDS",
    "flip_fused_embeddings",
    "split_pairs",
    "pair_similarity",
    "verification_accuracy",
    "val_at_far",
    "roc_curve",
    "tar_at_far",
    "evaluate_bin",
]

#: Distance thresholds searched for accuracy, as insightface's ``evaluate``.
ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)
#: The finer grid insightface's ``evaluate`` uses for VAL@FAR.
VAL_THRESHOLDS = np.arange(0, 4, 0.001)

_DEFAULT_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


# --------------------------------------------------------------------------- #
# Embeddings of pairs
# --------------------------------------------------------------------------- #


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    # As sklearn.preprocessing.normalize, which insightface uses: rows with a
    # (near) zero norm are left as they are rather than divided by zero.
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms < 10 * np.finfo(norms.dtype).eps] = 1.0
    return x / norms[:, None]


def _embed_batched(embed_fn, images, batch_size):
    n = len(images)
    if batch_size is None or batch_size >= n:
        return np.asarray(embed_fn(images), dtype=np.float64)
    out = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        # insightface's trick: the last batch is the last `batch_size` images
        # (overlapping the previous batch) so every call has the same shape and
        # a jitted embed_fn compiles once; the overlap is dropped.
        batch = np.asarray(embed_fn(images[stop - batch_size : stop]))
        out.append(batch[batch_size - (stop - start) :])
    return np.concatenate(out, axis=0).astype(np.float64, copy=False)


def flip_fused_embeddings(
    embed_fn: Callable,
    images,
    *,
    batch_size: int | None = None,
    flip_axis: int = 2,
) -> np.ndarray:
    """Flip-fused, L2-normalised embeddings of a batch of images.

    e_i = normalise(f(x_i) + f(flip(x_i))), the test-time augmentation of
    insightface's ``verification.test`` (the "Accuracy-Flip" it reports).

    Args:
      embed_fn: maps a batch of images (a slice of `images`, same type) to
        embeddings [b, D]. Preprocessing (e.g. insightface's (x / 255 - 0.5) /
        0.5 and NCHW layout) is the caller's: `embed_fn` gets the raw slice.
      images: images [N, H, W, C] (NHWC, e.g. from `load_bin`), NumPy or JAX.
      batch_size: images per `embed_fn` call; None embeds all at once. Every
        call has exactly `batch_size` images (the last batch overlaps the one
        before it, as insightface does), so a jitted model compiles once.
      flip_axis: the width axis of `images` (2 for NHWC, 3 for NCHW).

    Returns:
      float64 embeddings [N, D], each row of unit L2 norm (zero rows stay 0).

    Example:
      >>> import numpy as np
      >>> images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
      >>> embed = lambda x: np.asarray(x, np.float32).reshape(len(x), -1)[:, :8]
      >>> flip_fused_embeddings(embed, images, batch_size=1).shape
      (2, 8)

    References:
      Deng et al., "ArcFace", CVPR 2019, https://arxiv.org/abs/1801.07698;
      insightface recognition/arcface_torch/eval/verification.py (``test``).
    """
    return _flip_fused(embed_fn, images, batch_size, flip_axis)[0]


def _flip_fused(embed_fn, images, batch_size, flip_axis, fn="flip_fused_embeddings"):
    """(fused normalised embeddings [N, D], xnorm: mean norm of f(x) and f(flip x))."""
    ndim = np.ndim(images)
    if ndim < 2 or not -ndim <= flip_axis < ndim:
        raise ValueError(
            f"{fn}: `images` of shape {tuple(np.shape(images))} "
            f"has no axis {flip_axis} to flip."
        )
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"{fn}: `batch_size` must be >= 1, got {batch_size}.")
    index = [slice(None)] * ndim
    index[flip_axis] = slice(None, None, -1)
    plain = _embed_batched(embed_fn, images, batch_size)
    flipped = _embed_batched(embed_fn, images[tuple(index)], batch_size)
    fused = _checks.embeddings_array(
        plain + flipped, "embed_fn(images) + embed_fn(flip(images))", "embed_fn"
    )
    norms = np.linalg.norm(np.concatenate([plain, flipped]), axis=1)
    return _normalize_rows(fused), float(np.mean(norms)) if norms.size else 0.0


def split_pairs(embeddings) -> tuple[np.ndarray, np.ndarray]:
    """Split the embeddings of a `.bin` set into its two sides: rows 0::2, 1::2.

    insightface `.bin` files store pair i as images 2i and 2i + 1.

    Args:
      embeddings: embeddings [2P, D].

    Returns:
      (emb1, emb2), each [P, D].

    Example:
      >>> import numpy as np
      >>> e1, e2 = split_pairs(np.eye(4))
      >>> e1.shape, e2.shape
      ((2, 4), (2, 4))
    """
    arr = np.asarray(embeddings)
    if arr.ndim != 2 or arr.shape[0] % 2:
        raise ValueError(
            "split_pairs: `embeddings` must have shape [2P, D] (an even number of "
            f"rows, pair i = rows 2i and 2i + 1); got shape {arr.shape}."
        )
    return arr[0::2], arr[1::2]


def _pair_embeddings(emb1, emb2, fn):
    e1 = _checks.embeddings_array(emb1, "emb1", fn)
    e2 = _checks.embeddings_array(emb2, "emb2", fn)
    if e1.shape != e2.shape:
        raise ValueError(
            f"{fn}: `emb1` and `emb2` must have the same shape [P, D] (row i of "
            f"each is pair i); got `emb1` shape {e1.shape} and `emb2` shape "
            f"{e2.shape}."
        )
    return e1, e2


def _check_pairs(emb1, emb2, issame, fn):
    e1, e2 = _pair_embeddings(emb1, emb2, fn)
    same = _checks.bool_vector(
        issame, "issame", fn, n=e1.shape[0], ref="emb1", ref_shape=e1.shape
    )
    _checks.both_classes(same, "issame", fn)
    return e1, e2, same


def pair_similarity(emb1, emb2) -> np.ndarray:
    """Cosine similarity of each pair: s_i = x̂1_i · x̂2_i (higher = more similar).

    Monotone in insightface's distance: ||x̂1 - x̂2||² = 2 - 2 s, so this is the
    score to feed `tar_at_far` for the pairs scored by `verification_accuracy`.

    Args:
      emb1: embeddings [P, D]; emb2: embeddings [P, D] (row i pairs with row i).

    Returns:
      float64 similarities [P] in [-1, 1].

    Example:
      >>> import numpy as np
      >>> pair_similarity(np.array([[1.0, 0.0]]), np.array([[3.0, 3.0]])).round(4)
      array([0.7071])
    """
    e1, e2 = _pair_embeddings(emb1, emb2, "pair_similarity")
    s = np.einsum("ij,ij->i", _normalize_rows(e1), _normalize_rows(e2))
    return np.clip(s, -1.0, 1.0)


# --------------------------------------------------------------------------- #
# LFW-style k-fold protocol
# --------------------------------------------------------------------------- #


def _folds(n: int, n_folds: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index arrays of sklearn's KFold(n_folds, shuffle=False).

    Contiguous folds; the first n % n_folds folds hold one extra pair. As
    insightface's LFold, one fold means train == test == all pairs.
    """
    idx = np.arange(n)
    if n_folds == 1:
        yield idx, idx
        return
    sizes = np.full(n_folds, n // n_folds)
    sizes[: n % n_folds] += 1
    stops = np.cumsum(sizes)
    for start, stop in zip(stops - sizes, stops, strict=True):
        yield np.concatenate([idx[:start], idx[stop:]]), idx[start:stop]


def _accepted(dist: np.ndarray, thresholds) -> np.ndarray:
    """For each threshold t, the number of distances with dist < t (strict)."""
    return np.searchsorted(np.sort(dist), thresholds, side="left")


def _rates(dist, same, thresholds):
    """tpr, fpr, accuracy at each threshold; a pair is accepted when dist < t.

    Zero denominators give a rate of 0, as insightface's calculate_accuracy.
    """
    pos, neg = dist[same], dist[~same]
    tp, fp = _accepted(pos, thresholds), _accepted(neg, thresholds)
    tpr = tp / pos.size if pos.size else np.zeros(len(thresholds))
    fpr = fp / neg.size if neg.size else np.zeros(len(thresholds))
    acc = (tp + (neg.size - fp)) / dist.size
    return tpr, fpr, acc


def _interp_threshold(far: np.ndarray, thresholds: np.ndarray, target: float):
    """Threshold at which the (non-decreasing) FAR curve reaches `target`.

    insightface calls scipy.interpolate.interp1d(far, thresholds,
    kind='slinear')(target). The FAR curve has long runs of equal values, which
    SciPy >= 1.9 rejects ("Expect x to not have duplicates", insightface issues
    #2152 and #2290); SciPy <= 1.8, under which the published numbers were
    computed, evaluated the degree-1 spline on the last non-empty knot interval:
    the straight line between the last point with far <= target and the point
    after it. That is what is computed here, with no SciPy needed. When target
    equals the largest FAR, the threshold is the first one reaching it (old
    SciPy returned NaN there when that value was repeated).
    """
    a = int(np.searchsorted(far, target, side="right")) - 1
    if a >= len(far) - 1:
        return float(thresholds[int(np.searchsorted(far, target, side="left"))])
    b = a + 1
    w = (target - far[a]) / (far[b] - far[a])
    return float(thresholds[a] + w * (thresholds[b] - thresholds[a]))


def _val_far(dist, same, far_target, n_folds, thresholds):
    val = np.zeros(n_folds)
    far = np.zeros(n_folds)
    chosen = np.zeros(n_folds)
    for f, (train, test) in enumerate(_folds(dist.size, n_folds)):
        neg_train = dist[train][~same[train]]
        if neg_train.size == 0:
            # insightface divides by zero here; the fold's VAL is undefined.
            val[f] = far[f] = chosen[f] = np.nan
            continue
        far_train = _accepted(neg_train, thresholds) / neg_train.size
        if far_train.max() >= far_target:
            t = _interp_threshold(far_train, thresholds, far_target)
        else:
            t = 0.0  # insightface's fallback: accept nothing.
        chosen[f] = t
        pos, neg = dist[test][same[test]], dist[test][~same[test]]
        val[f] = np.sum(pos < t) / pos.size if pos.size else np.nan
        far[f] = np.sum(neg < t) / neg.size if neg.size else np.nan
    return val, far, chosen


def _check_folds(n_folds, n_pairs, fn, far_target):
    if not 0.0 <= far_target <= 1.0:
        raise ValueError(f"{fn}: `far_target` must be in [0, 1], got {far_target!r}.")
    if not isinstance(n_folds, int | np.integer) or not 1 <= n_folds <= n_pairs:
        raise ValueError(
            f"{fn}: `n_folds` must be an integer in [1, {n_pairs}] (the number of "
            f"pairs), got {n_folds!r}."
        )


def _squared_l2(e1, e2, normalize):
    if normalize:
        e1, e2 = _normalize_rows(e1), _normalize_rows(e2)
    return np.sum(np.square(np.subtract(e1, e2)), axis=1)


def verification_accuracy(
    emb1,
    emb2,
    issame,
    *,
    n_folds: int = 10,
    far_target: float = 1e-3,
    normalize: bool = True,
) -> dict:
    """LFW-style k-fold verification accuracy, exactly as insightface computes it.

    Row i of `emb1` and row i of `emb2` form pair i. With x̂ the L2-normalised
    embeddings, the pair distance is d_i = ||x̂1_i - x̂2_i||² in [0, 4] and a
    pair is predicted "same" when d_i < t (strict). The pairs are cut into
    `n_folds` contiguous folds (sklearn KFold without shuffling: the first
    P % n_folds folds are one pair larger). For each fold, t is the threshold
    of ``np.arange(0, 4, 0.01)`` with the best accuracy on the other folds (the
    first one on ties, np.argmax) and the fold's accuracy is measured at that
    t on the held-out fold. Reported: mean and std (ddof 0) over folds.

    VAL@FAR (`far_target`, default 1e-3) also follows insightface: per fold,
    the FAR of the other folds is computed on the finer grid
    ``np.arange(0, 4, 0.001)``, the threshold where it reaches `far_target` is
    linearly interpolated (see `val_at_far`), and VAL = TAR and FAR are
    measured with it on the held-out fold; mean VAL, its std and mean FAR.

    The flip fusion x̂ = normalise(f(img) + f(flip(img))) happens before this
    function, in `flip_fused_embeddings`; pass its output, split into pairs
    with `split_pairs` for `.bin` sets (or use `evaluate_bin`).

    insightface quirks kept on purpose: strict d < t; thresholds only on the
    0.01 grid (0.001 for VAL); argmax picks the smallest of tied thresholds;
    ROC curves are per-fold test-set rates averaged over folds (not one ROC of
    all pairs); fold rates with a zero denominator count as 0; with one fold,
    train == test. Deviations: mismatched lengths raise instead of being
    truncated to the shorter; PCA (insightface's `pca` argument) is not
    offered; a fold with no impostor pairs gives NaN VAL/FAR instead of
    ZeroDivisionError.

    Args:
      emb1: embeddings [P, D] of the first image of each pair.
      emb2: embeddings [P, D] of the second image of each pair.
      issame: bool [P], True for genuine (same identity) pairs.
      n_folds: number of contiguous folds, 1 <= n_folds <= P.
      far_target: the FAR at which VAL is reported.
      normalize: L2-normalise the rows first (as insightface's ``test`` does
        before ``evaluate``). Zero rows stay zero.

    Returns:
      A dict of NumPy values:
        - ``mean``, ``std``: mean and std (ddof 0) of the fold accuracies.
        - ``accuracy``: [n_folds] held-out accuracy of each fold.
        - ``best_thresholds``: [n_folds] distance threshold chosen per fold.
        - ``thresholds``: [400] the grid; ``tpr``, ``fpr``: [400] test-fold
          rates at each threshold, averaged over folds (insightface's ROC).
        - ``val``, ``val_std``, ``far``: VAL@far_target (mean, std) and the
          mean achieved FAR; ``val_folds``, ``far_folds``,
          ``val_thresholds``: [n_folds] per fold.
        - ``distances``: [P] the squared L2 distances.

    Example:
      >>> import numpy as np
      >>> rng = np.random.default_rng(0)
      >>> e1 = rng.normal(size=(200, 16))
      >>> same = np.arange(200) % 2 == 0
      >>> e2 = np.where(same[:, None], e1 + 0.3 * rng.normal(size=(200, 16)),
      ...               rng.normal(size=(200, 16)))
      >>> result = verification_accuracy(e1, e2, same)
      >>> round(float(result["mean"]), 3), result["accuracy"].shape
      (0.995, (10,))

    References:
      Huang et al., "Labeled Faces in the Wild", 2007 (the protocol);
      insightface recognition/arcface_torch/eval/verification.py (``evaluate``,
      ``calculate_roc``, ``calculate_val``), from D. Sandberg's facenet.
    """
    fn = "verification_accuracy"
    e1, e2, same = _check_pairs(emb1, emb2, issame, fn)
    _check_folds(n_folds, same.size, fn, far_target)
    dist = _squared_l2(e1, e2, normalize)
    thresholds = ACCURACY_THRESHOLDS
    tprs = np.zeros((n_folds, len(thresholds)))
    fprs = np.zeros((n_folds, len(thresholds)))
    accuracy = np.zeros(n_folds)
    best = np.zeros(n_folds)
    for f, (train, test) in enumerate(_folds(dist.size, n_folds)):
        _, _, acc_train = _rates(dist[train], same[train], thresholds)
        i = int(np.argmax(acc_train))
        tprs[f], fprs[f], acc_test = _rates(dist[test], same[test], thresholds)
        accuracy[f], best[f] = acc_test[i], thresholds[i]
    val, far, val_thr = _val_far(dist, same, far_target, n_folds, VAL_THRESHOLDS)
    return {
        "mean": np.mean(accuracy),
        "std": np.std(accuracy),
        "accuracy": accuracy,
        "best_thresholds": best,
        "thresholds": thresholds.copy(),
        "tpr": np.mean(tprs, axis=0),
        "fpr": np.mean(fprs, axis=0),
        "val": np.mean(val),
        "val_std": np.std(val),
        "far": np.mean(far),
        "val_folds": val,
        "far_folds": far,
        "val_thresholds": val_thr,
        "distances": dist,
    }


def val_at_far(
    emb1,
    emb2,
    issame,
    *,
    far_target: float = 1e-3,
    n_folds: int = 10,
    normalize: bool = True,
) -> dict:
    """VAL (validation rate, = TAR) at a FAR, by insightface's k-fold rule.

    Per fold: FAR_train(t) = #{impostor pairs of the other folds with d < t} /
    #impostors for t in ``np.arange(0, 4, 0.001)``; if max FAR_train >=
    `far_target`, t* is the linear interpolation of the threshold at
    `far_target` (insightface: ``interp1d(far_train, thresholds,
    kind='slinear')``; where FAR_train is flat, the line from the last grid
    point with FAR <= target to the next one, which is what SciPy <= 1.8
    computed: newer SciPy refuses the repeated values); otherwise t* = 0
    (accept nothing). VAL and FAR are then measured with d < t* on the
    held-out fold. `verification_accuracy` returns the same numbers.

    Args:
      emb1, emb2: embeddings [P, D], row i of each forming pair i.
      issame: bool [P].
      far_target: target false accept rate (insightface: 1e-3).
      n_folds: contiguous folds, as `verification_accuracy`.
      normalize: L2-normalise the rows first.

    Returns:
      dict with ``val`` (mean), ``val_std`` (ddof 0), ``far`` (mean achieved
      FAR), and per fold ``val_folds``, ``far_folds``, ``val_thresholds``.

    Example:
      >>> import numpy as np
      >>> e1 = np.eye(4)
      >>> e2 = np.array([[1.0, 0.1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0.1],
      ...                [1, 0, 0, 0]])
      >>> same = np.array([True, False, True, False])
      >>> float(val_at_far(e1, e2, same, far_target=0.5, n_folds=2)["val"])
      1.0

    References:
      Schroff et al., "FaceNet", CVPR 2015 (VAL/FAR definitions),
      https://arxiv.org/abs/1503.03832; insightface eval/verification.py.
    """
    fn = "val_at_far"
    e1, e2, same = _check_pairs(emb1, emb2, issame, fn)
    _check_folds(n_folds, same.size, fn, far_target)
    dist = _squared_l2(e1, e2, normalize)
    val, far, thr = _val_far(dist, same, far_target, n_folds, VAL_THRESHOLDS)
    return {
        "val": np.mean(val),
        "val_std": np.std(val),
        "far": np.mean(far),
        "val_folds": val,
        "far_folds": far,
        "val_thresholds": thr,
    }


# --------------------------------------------------------------------------- #
# One ROC over all pairs
# --------------------------------------------------------------------------- #


def _check_scores(scores, issame, fn):
    s = _checks.float_array(scores, "scores", fn, rank=1, layout="[P]")
    same = _checks.bool_vector(
        issame, "issame", fn, n=s.size, ref="scores", ref_shape=s.shape
    )
    _checks.both_classes(same, "issame", fn)
    return s, same


def roc_curve(
    scores, issame, *, drop_intermediate: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve of similarity scores, identical to sklearn.metrics.roc_curve.

    Higher score = more similar; a pair is accepted when score >= threshold.
    Pass -distance for distances. Points run from (0, 0) at threshold +inf to
    (1, 1); with `drop_intermediate`, points collinear with their neighbours
    are dropped exactly as sklearn does (default there too).

    Args:
      scores: similarity scores [P].
      issame: bool [P], True for genuine pairs.
      drop_intermediate: drop collinear points (sklearn's default).

    Returns:
      (fpr, tpr, thresholds), each [M]; thresholds decreasing, first +inf.

    Example:
      >>> import numpy as np
      >>> fpr, tpr, thr = roc_curve(np.array([0.9, 0.8, 0.3, 0.1]),
      ...                           np.array([True, False, True, False]))
      >>> fpr.tolist(), tpr.tolist()
      ([0.0, 0.0, 0.5, 0.5, 1.0], [0.0, 0.5, 0.5, 1.0, 1.0])

    References:
      Fawcett, "An introduction to ROC analysis", Pattern Recognition Letters
      2006; sklearn.metrics.roc_curve (the reference this matches).
    """
    s, same = _check_scores(scores, issame, "roc_curve")
    order = np.argsort(s, kind="mergesort")[::-1]
    s, same = s[order], same[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tps = np.cumsum(same, dtype=np.float64)[last_of_run]
    fps = 1.0 + last_of_run - tps
    thresholds = s[last_of_run]
    if drop_intermediate and fps.size > 2:
        corner = np.logical_or(np.diff(fps, 2), np.diff(tps, 2))
        keep = np.flatnonzero(np.r_[True, corner, True])
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    thresholds = np.r_[np.inf, thresholds]
    return fps / fps[-1], tps / tps[-1], thresholds


def tar_at_far(
    scores,
    issame,
    *,
    fars: Sequence[float] = _DEFAULT_FARS,
    drop_intermediate: bool = True,
) -> dict:
    """TAR at fixed FARs from one ROC over all pairs (IJB-B/C style).

    For each target FAR f: among the ROC points (FPR_j, TPR_j) of `roc_curve`,
    take the one with |FPR_j - f| smallest, and report its TPR. No
    interpolation. Ties (several points equally near, i.e. one FPR with several
    TPRs) go to the largest TPR, as insightface's IJB evaluation does (it
    flips the curve and takes the first minimum: "select largest tpr at same
    fpr"). With few impostor pairs a small target FAR is unattainable and the
    nearest point may be FPR = 0 (TAR 0 at threshold +inf); check
    ``actual_far``.

    Args:
      scores: similarity scores [P]; higher = more similar (pass -distance
        for distances; for embeddings, `pair_similarity`).
      issame: bool [P], True for genuine pairs.
      fars: target false accept rates.
      drop_intermediate: as sklearn's roc_curve default (which insightface
        uses); it changes only which FPR/threshold is reported on flat parts
        of the curve, never the TAR.

    Returns:
      dict of NumPy arrays aligned with `fars`: ``far`` (the targets),
      ``tar``, ``threshold`` (accept when score >= threshold), ``actual_far``
      (the FPR of the chosen point); and ``auc`` (float, trapezoidal area
      under the ROC).

    Example:
      >>> import numpy as np
      >>> out = tar_at_far(np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1]),
      ...                  np.array([True, True, False, True, False, False]),
      ...                  fars=(0.0, 0.3))
      >>> out["tar"].round(3).tolist(), out["actual_far"].round(3).tolist()
      ([0.667, 1.0], [0.0, 0.333])

    References:
      Maze et al., "IARPA Janus Benchmark-C", ICB 2018; insightface
      recognition/_evaluation_/ijb/ijb_11.py (selection rule).
    """
    fn = "tar_at_far"
    targets = np.asarray(fars, dtype=np.float64).reshape(-1)
    if targets.size == 0 or not np.all((targets >= 0) & (targets <= 1)):
        raise ValueError(f"{fn}: `fars` must be values in [0, 1], got {fars!r}.")
    fpr, tpr, thr = roc_curve(scores, issame, drop_intermediate=drop_intermediate)
    gap = np.abs(fpr[None, :] - targets[:, None])
    # Last index of the minimum = first minimum of the flipped curve.
    j = fpr.size - 1 - np.argmin(gap[:, ::-1], axis=1)
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    return {
        "far": targets,
        "tar": tpr[j],
        "threshold": thr[j],
        "actual_far": fpr[j],
        "auc": auc,
    }


def evaluate_pairs(
    images,
    issame,
    embed_fn: Callable,
    *,
    batch_size: int | None = 64,
    n_folds: int = 10,
) -> dict:
    """Score a model on verification pairs already in memory (a loaded `.bin`).

    flip_fused_embeddings -> split_pairs -> verification_accuracy, i.e.
    insightface's "Accuracy-Flip", plus its ``xnorm``: the mean L2 norm of the
    raw embeddings f(x) and f(flip(x)) of every image (insightface's
    ``verification.test`` reports it next to the accuracy; a collapsing
    feature norm shows there first).

    Args:
      images: uint8 [N, H, W, 3] (NHWC, e.g. from `load_bin`); pair i is
        images 2i and 2i + 1.
      issame: bool [N // 2].
      embed_fn: uint8 images [b, H, W, 3] -> embeddings [b, D];
        preprocessing is its job.
      batch_size: images per `embed_fn` call (fixed-shape batches).
      n_folds: folds of `verification_accuracy`.

    Returns:
      The dict of `verification_accuracy` plus ``xnorm`` (float).

    Example:
      >>> import numpy as np
      >>> rng = np.random.default_rng(0)
      >>> images = rng.integers(0, 255, size=(40, 8, 8, 3), dtype=np.uint8)
      >>> embed = lambda x: np.asarray(x, np.float32).reshape(len(x), -1)
      >>> out = evaluate_pairs(images, np.arange(20) % 2 == 0, embed)
      >>> out["accuracy"].shape, out["xnorm"] > 0
      ((10,), True)
    """
    embeddings, xnorm = _flip_fused(embed_fn, images, batch_size, 2, "evaluate_pairs")
    emb1, emb2 = split_pairs(embeddings)
    out = verification_accuracy(emb1, emb2, issame, n_folds=n_folds)
    out["xnorm"] = xnorm
    return out


def evaluate_bin(
    path,
    embed_fn: Callable,
    *,
    batch_size: int | None = 64,
    n_folds: int = 10,
) -> dict:
    """Score a model on an insightface `.bin` set (LFW, CFP-FP, AgeDB-30, ...).

    load_bin -> `evaluate_pairs` (flip_fused_embeddings -> split_pairs ->
    verification_accuracy), i.e. insightface's "Accuracy-Flip" and xnorm.

    Args:
      path: the `.bin` file.
      embed_fn: uint8 images [b, H, W, 3] (RGB, NHWC) -> embeddings [b, D];
        preprocessing is its job.
      batch_size: images per `embed_fn` call (fixed-shape batches).
      n_folds: folds of `verification_accuracy`.

    Returns:
      The dict of `verification_accuracy` plus ``xnorm`` (float).

    Example:
      >>> import os, tempfile, numpy as np
      >>> from margin_jax.eval import write_bin
      >>> rng = np.random.default_rng(0)
      >>> images = rng.integers(0, 255, size=(40, 8, 8, 3), dtype=np.uint8)
      >>> path = os.path.join(tempfile.mkdtemp(), "toy.bin")
      >>> write_bin(path, images, np.arange(20) % 2 == 0)
      >>> embed = lambda x: np.asarray(x, np.float32).reshape(len(x), -1)
      >>> out = evaluate_bin(path, embed, batch_size=16)
      >>> out["accuracy"].shape
      (10,)
    """
    from margin_jax.eval.bin_io import load_bin

    images, issame = load_bin(path)
    return evaluate_pairs(
        images, issame, embed_fn, batch_size=batch_size, n_folds=n_folds
    )
