"""Plots of verification results: ROC with TAR@FAR marks, genuine/impostor scores.

matplotlib is an optional extra (``pip install margin-jax[plots]``). Figures are
built with the object-oriented API on an Agg canvas, so they never touch
pyplot's global state or need a display.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from margin_jax.eval import _checks
from margin_jax.eval.verification import _check_scores, roc_curve, tar_at_far

__all__ = ["plot_roc", "plot_score_histogram"]

_DEFAULT_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def _new_figure(fn: str, figsize):
    figure = _checks.require("matplotlib.figure", fn)
    backend = _checks.require("matplotlib.backends.backend_agg", fn)
    fig = figure.Figure(figsize=figsize, layout="constrained")
    backend.FigureCanvasAgg(fig)
    return fig


def _save(fig, path):
    if path is not None:
        fig.savefig(path, format="png", dpi=120)


def plot_roc(
    scores,
    issame,
    path=None,
    *,
    fars: Sequence[float] = _DEFAULT_FARS,
    label: str | None = None,
    title: str = "ROC",
    log_far: bool = True,
):
    """Plot ROC curves (TAR vs FAR) with the TAR@FAR points marked; save as PNG.

    Each curve is `roc_curve` of one set of similarity scores; the points
    chosen by `tar_at_far` are marked and labelled "TAR@target FAR". On a log
    FAR axis FAR = 0 cannot be drawn: the axis starts at
    min(fars, 1 / #impostors) / 2 and a chosen point with FAR = 0 (a target
    below 1 / #impostors) is drawn on that left edge.

    Args:
      scores: similarity scores [P] (higher = more similar), or a mapping
        name -> scores [P] to compare several models on the same pairs.
      issame: bool [P], True for genuine pairs.
      path: where to write the PNG; None to only return the figure.
      fars: target FARs to mark.
      label: legend name of a single curve.
      title: axes title.
      log_far: logarithmic FAR axis (the usual IJB plot).

    Returns:
      The matplotlib Figure (Agg canvas).

    Example:
      >>> import numpy as np
      >>> rng = np.random.default_rng(0)
      >>> same = np.arange(1000) % 2 == 0
      >>> scores = rng.normal(size=1000) + 2 * same
      >>> fig = plot_roc(scores, same, fars=(1e-2, 1e-1))
      >>> len(fig.axes)
      1
    """
    fn = "plot_roc"
    curves = dict(scores) if isinstance(scores, Mapping) else {label or "model": scores}
    fig = _new_figure(fn, (6.4, 4.8))
    ax = fig.add_subplot()
    lo = 1.0
    for n_curve, (name, s) in enumerate(curves.items()):
        s, same = _check_scores(s, issame, fn)
        fpr, tpr, _ = roc_curve(s, same)
        points = tar_at_far(s, same, fars=fars)
        lo = min(lo, min(fars), 1.0 / np.sum(~same))
        (line,) = ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUC {points['auc']:.4f})")
        for far, tar, actual in zip(
            points["far"], points["tar"], points["actual_far"], strict=True
        ):
            x = actual if actual > 0 or not log_far else lo / 2
            ax.plot(x, tar, "o", ms=5, color=line.get_color())
            ax.annotate(
                f"{tar:.3f}@{far:.0e}",
                (x, tar),
                textcoords="offset points",
                xytext=(4, -10 - 9 * n_curve),
                fontsize=7,
                color=line.get_color(),
            )
    if log_far:
        ax.set_xscale("log")
        ax.set_xlim(lo / 2, 1.0)
    else:
        ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("False accept rate (FAR)")
    ax.set_ylabel("True accept rate (TAR)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)
    return fig


def plot_score_histogram(
    scores,
    issame,
    path=None,
    *,
    bins: int = 100,
    threshold: float | None = None,
    title: str = "Genuine vs impostor scores",
    xlabel: str = "score",
):
    """Histogram of the scores of genuine and impostor pairs; save as PNG.

    Both histograms are normalised to unit area (the two classes usually
    differ in size), on shared bins.

    Args:
      scores: scores [P] (similarities or distances; `xlabel` says which).
      issame: bool [P], True for genuine pairs.
      path: where to write the PNG; None to only return the figure.
      bins: number of shared bins.
      threshold: optional decision threshold, drawn as a vertical line.
      title: axes title.
      xlabel: x axis label.

    Returns:
      The matplotlib Figure (Agg canvas).

    Example:
      >>> import numpy as np
      >>> same = np.arange(100) % 2 == 0
      >>> fig = plot_score_histogram(np.linspace(0, 1, 100), same, bins=10)
      >>> len(fig.axes)
      1
    """
    fn = "plot_score_histogram"
    s, same = _check_scores(scores, issame, fn)
    fig = _new_figure(fn, (6.4, 4.0))
    ax = fig.add_subplot()
    edges = np.histogram_bin_edges(s, bins=bins)
    ax.hist(
        s[same],
        bins=edges,
        density=True,
        alpha=0.55,
        color="tab:blue",
        label=f"genuine ({same.sum()})",
    )
    ax.hist(
        s[~same],
        bins=edges,
        density=True,
        alpha=0.55,
        color="tab:red",
        label=f"impostor ({(~same).sum()})",
    )
    if threshold is not None:
        ax.axvline(
            threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.3g}"
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    _save(fig, path)
    return fig
