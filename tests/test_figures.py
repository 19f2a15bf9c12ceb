"""train/figures: the checker can fail, the margins' geometry, the gallery CLI.

The notebooks themselves run in the test command (nbmake); these are the
pieces whose answers are not visible in a picture.
"""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

import margin_jax as mj
from train import figures
from train.figures import __main__ as gallery
from train.figures import gradients, zoo


def test_check_loss_passes_exact_gradients_and_catches_a_surrogate():
    good = gradients.check_loss(functools.partial(mj.arcface_loss, scale=16.0))
    assert good.ok and good.max_abs_error < 1e-6
    assert good.finite_at_boundary and good.non_negative
    # Straight-through ArcFace is NormFace's gradient on ArcFace's value: not
    # the loss's derivative, and the check must say so.
    surrogate = gradients.check_loss(
        functools.partial(mj.arcface_loss, scale=16.0, straight_through=True)
    )
    assert not surrogate.ok and surrogate.max_abs_error > 0.1


def test_check_loss_flags_negative_and_non_finite_losses():
    negative = gradients.check_loss(lambda c, y: -mj.normface_loss(c, y, scale=4.0))
    assert not negative.non_negative and not negative.ok
    # sqrt(1 - c²) unguarded: infinite derivative at cos = ±1.
    naive = gradients.check_loss(lambda c, y: jnp.sum(jnp.sqrt(1.0 - c**2), axis=1))
    assert not naive.finite_at_boundary and not naive.ok


def test_check_loss_on_embeddings_and_bad_argument():
    check = gradients.check_loss(
        lambda x, y: mj.contrastive_loss(x, y), on="embeddings"
    )
    assert check.ok
    # A distance without a guard at 0: NaN gradient for coincident embeddings.
    naive = gradients.check_loss(
        lambda x, y: jnp.sqrt(jnp.sum((x - x[:1]) ** 2, axis=1)), on="embeddings"
    )
    assert not naive.finite_at_boundary
    with pytest.raises(ValueError, match="`on` must be 'cosines' or 'embeddings'"):
        gradients.check_loss(mj.normface_loss, on="logits")


def test_arcface_region_between_classes_is_2m_wide():
    """Class 1 wins with margin iff θ1 + m < θ2 (inside [0, π - m])."""
    arc = functools.partial(mj.arcface_target, margin=0.5)
    theta1 = np.array([0.3, 0.3, 0.3, 1.0])
    theta2 = np.array([0.79, 0.81, 0.3, 1.49])
    one, two = zoo._regions(arc, theta1, theta2)
    np.testing.assert_array_equal(one, [False, True, False, False])
    assert not two.any()


def test_runs_of_a_mask():
    assert zoo._runs(np.array([0, 1, 1, 0, 1], bool)) == [(1, 3), (4, 5)]
    assert zoo._runs(np.zeros(3, bool)) == []


def test_quick_mode_picks_the_step_count(monkeypatch):
    monkeypatch.setenv(figures.QUICK_ENV, "1")
    assert figures.quick() and figures.steps(600, 4) == 4
    monkeypatch.setenv(figures.QUICK_ENV, "0")
    assert not figures.quick() and figures.steps(600, 4) == 600


def test_gallery_writes_pngs(tmp_path, capsys):
    gallery.main(["--out", str(tmp_path), "--only", "target_logits", "--dpi", "40"])
    png = (tmp_path / "target_logits.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


def test_gallery_rejects_unknown_figure(capsys):
    with pytest.raises(SystemExit):
        gallery.main(["--only", "hyperbola"])
    err = capsys.readouterr().err
    assert "hyperbola" in err and "valid choices for --only" in err


def test_a_diverged_run_is_reported_not_raised(monkeypatch, tmp_path):
    from train import train as train_lib
    from train.figures import hypersphere

    def diverge(config, workdir):
        raise train_lib.NonFiniteLossError("Non-finite loss (nan) at step 3")

    monkeypatch.setenv(figures.DATA_ENV, str(tmp_path / "tfds"))
    monkeypatch.setenv(hypersphere.RUNS_ENV, str(tmp_path / "runs"))
    monkeypatch.setattr(train_lib, "train_and_evaluate", diverge)
    runs = hypersphere.train_all(["sv_softmax"], dims=(2,), steps=3, progress=False)
    run = runs["sv_softmax", 2]
    assert "Non-finite loss" in run.diverged
    assert run.label == "SV-Arc-Softmax (margin = 0.2)"
    table = hypersphere.accuracy_table(runs)
    assert "| SV-Arc-Softmax (margin = 0.2) | diverged | diverged | diverged |" in table
    hypersphere.plot_hypersphere(runs).savefig(tmp_path / "h.png", dpi=30)


def test_config_id_changes_with_the_config():
    from train.figures import hypersphere

    a = hypersphere.run_config("arcface", 2, steps=10)
    b = hypersphere.run_config("arcface", 3, steps=10)
    assert hypersphere.config_id(a) == hypersphere.config_id(
        a.copy_and_resolve_references()
    )
    assert hypersphere.config_id(a) != hypersphere.config_id(b)
