"""Closed-set classification metrics."""

from __future__ import annotations

import numpy as np

from margin_jax.eval import _checks

__all__ = ["macro_accuracy"]


def macro_accuracy(predictions, labels) -> float:
    """Class-balanced (macro) accuracy: the mean over classes of per-class recall.

    macro = (1 / |C|) Σ_{c ∈ C} #{i: y_i = c, ŷ_i = c} / #{i: y_i = c}, with C
    the classes present in `labels`. Equal to sklearn's
    balanced_accuracy_score (adjusted=False): predicted classes that never
    occur in `labels` lower the recall of the true classes but add no term.
    With a single class it is that class's recall.

    Args:
      predictions: predicted class indices [N] (integers), or scores/logits
        [N, C], reduced with argmax over the last axis.
      labels: true class indices [N] (integers).

    Returns:
      Macro accuracy in [0, 1] (Python float).

    Example:
      >>> import numpy as np
      >>> macro_accuracy(np.array([0, 0, 0, 1]), np.array([0, 0, 0, 1]))
      1.0
      >>> macro_accuracy(np.array([0, 0, 0, 0]), np.array([0, 0, 0, 1]))
      0.5

    References:
      Brodersen et al., "The balanced accuracy and its posterior
      distribution", ICPR 2010.
    """
    fn = "macro_accuracy"
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"{fn}: `labels` must be a non-empty integer array of shape [N]; got "
            f"dtype {y.dtype} with shape {y.shape}."
        )
    p = np.asarray(predictions)
    if p.ndim == 2:
        p = _checks.float_array(p, "predictions", fn, rank=2, layout="[N, C]")
        p = np.argmax(p, axis=-1)
    elif p.ndim != 1 or not np.issubdtype(p.dtype, np.integer):
        raise ValueError(
            f"{fn}: `predictions` must be integer class indices [N] or scores "
            f"[N, C]; got dtype {p.dtype} with shape {p.shape}."
        )
    if p.shape[0] != y.shape[0]:
        raise ValueError(
            f"{fn}: `predictions` and `labels` must have the same length N; got "
            f"`predictions` shape {np.shape(predictions)} and `labels` shape "
            f"{y.shape}."
        )
    classes, codes, counts = np.unique(y, return_inverse=True, return_counts=True)
    correct = np.bincount(codes.reshape(-1), weights=p == y, minlength=classes.size)
    return float(np.mean(correct / counts))
