"""Tests for the verification plots (matplotlib, optional extra)."""

import numpy as np
import pytest

from margin_jax.eval import plot_roc, plot_score_histogram

_PNG = b"\x89PNG\r\n\x1a\n"


def _scores(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    same = rng.random(n) < 0.3
    return np.clip(rng.normal(0.1, 0.15, n) + 0.5 * same, -1, 1), same


def test_plot_roc_writes_a_png(tmp_path):
    scores, same = _scores()
    path = tmp_path / "roc.png"
    fig = plot_roc(scores, same, path, fars=(1e-3, 1e-2, 1e-1), label="toy")
    data = path.read_bytes()
    assert data.startswith(_PNG) and len(data) > 5000
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert "toy (AUC" in ax.get_legend().get_texts()[0].get_text()
    assert len(ax.texts) == 3  # one annotation per TAR@FAR point


def test_plot_roc_several_models_and_linear_axis(tmp_path):
    scores, same = _scores()
    curves = {
        "a": scores,
        "b": scores + 0.2 * np.random.default_rng(1).normal(size=4000),
    }
    path = tmp_path / "roc2.png"
    fig = plot_roc(curves, same, path, log_far=False)
    assert path.stat().st_size > 0
    assert len(fig.axes[0].get_legend().get_texts()) == 2


def test_plot_score_histogram_writes_a_png(tmp_path):
    scores, same = _scores()
    path = tmp_path / "hist.png"
    fig = plot_score_histogram(scores, same, path, threshold=0.35, xlabel="cosine")
    data = path.read_bytes()
    assert data.startswith(_PNG) and len(data) > 5000
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert sorted(t.split()[0] for t in labels) == ["genuine", "impostor", "threshold"]


def test_plots_reject_bad_input(tmp_path):
    scores, same = _scores(n=10)
    with pytest.raises(ValueError, match="`issame` must have shape"):
        plot_roc(scores, same[:5])
    with pytest.raises(ValueError, match="NaN"):
        plot_score_histogram(np.r_[scores[:9], np.nan], same)
