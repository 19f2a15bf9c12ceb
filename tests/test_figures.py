"""figures/: the checker can fail, the margins' geometry, the gallery CLI.

The notebooks themselves run in the test command (nbmake); these are the
pieces whose answers are not visible in a picture.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import figures
import margin_jax as mj
from figures import __main__ as gallery
from figures import gradients, zoo


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


def test_cosine_losses_cover_the_registry():
    names = [label.split(" ")[0] for label in gradients.cosine_losses()]
    assert names == ["softmax", *mj.NAMED_STAGES]


def test_held_statistics_keep_the_value_and_gradient_of_their_batch():
    """Held at a batch, a stateful loss has the same value and jax.grad there."""
    cos = mj.cosine_logits(
        jnp.asarray(np.random.default_rng(0).normal(size=(6, 5)), jnp.float32),
        jnp.asarray(np.random.default_rng(1).normal(size=(4, 5)), jnp.float32),
    )
    labels = jnp.arange(6) % 4
    for stages in (mj.adacos_stages(), mj.curricularface_stages(scale=16.0)):
        held = gradients.hold_statistics(stages, cos, labels)
        assert held.statistics is None and held.state is None

        def stateful(c, stages=stages):
            return mj.margin_softmax_loss(c, labels, stages=stages)[0].sum()

        def frozen(c, held=held):
            return mj.margin_softmax_loss(c, labels, stages=held).sum()

        np.testing.assert_allclose(frozen(cos), stateful(cos), rtol=1e-6)
        np.testing.assert_allclose(
            jax.grad(frozen)(cos), jax.grad(stateful)(cos), rtol=1e-5, atol=1e-6
        )


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
    from figures import hypersphere
    from train import train as train_lib

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
    from figures import hypersphere

    a = hypersphere.run_config("arcface", 2, steps=10)
    b = hypersphere.run_config("arcface", 3, steps=10)
    assert hypersphere.config_id(a) == hypersphere.config_id(
        a.copy_and_resolve_references()
    )
    assert hypersphere.config_id(a) != hypersphere.config_id(b)


def test_target_curves_are_the_papers_formulas():
    theta = np.radians([0.0, 60.0, 160.0])
    curves = zoo.target_curves(theta)
    by_start = {name.split(":")[0].split(",")[0]: f for name, f in curves.items()}
    np.testing.assert_allclose(by_start["CosFace"], np.cos(theta) - 0.35, atol=1e-6)
    arc = curves["ArcFace: cos(θ + 0.5)"]
    naive = curves["cos(θ + 0.5) without the fallback"]
    np.testing.assert_allclose(arc[:2], np.cos(theta[:2] + 0.5), atol=1e-6)
    # Past π − m the fallback c − m·sin m keeps f decreasing; cos(θ + m) turns up.
    np.testing.assert_allclose(arc[2], np.cos(theta[2]) - 0.5 * np.sin(0.5), atol=1e-6)
    assert naive[2] > np.cos(np.pi) and arc[2] < naive[2]
    sphere = zoo.sphereface_curves(np.array([0.0, np.pi]), lambdas=(0.0,))
    for m in (2, 3, 4):  # ψ(0) = 1, ψ(π) = 1 − 2m
        np.testing.assert_allclose(
            sphere[f"m = {m}, λ = 0"], [1.0, 1 - 2 * m], atol=1e-5
        )


def test_non_target_stages_move_only_support_vectors():
    cos = jnp.array([[-0.5, 0.1, 0.3, 0.9]])
    target = jnp.array([[0.2]])
    for name, stage in zoo.non_target_stages(target=0.2).items():
        z = np.asarray(stage(cos, target))[0]
        np.testing.assert_allclose(z[:2], [-0.5, 0.1], err_msg=name)  # below f
        assert not np.allclose(z[2:], [0.3, 0.9]), name


def test_reweighting_gradients_sv_focal_and_hard_mining():
    from figures import support_vectors

    # Row 0: class 2 beats the margined target (a support vector); row 1 easy.
    cos = jnp.array([[0.5, 0.1, 0.6, -0.2], [0.95, -0.3, 0.0, -0.1]])
    labels = jnp.array([0, 0])
    grads = support_vectors.non_target_gradients(cos, labels, scale=16.0, margin=0.5)
    base, sv, focal, hm = (np.abs(g) for g in grads.values())
    assert sv[0, 2] > base[0, 2] and sv[0, 1] < base[0, 1]  # SV takes the share
    np.testing.assert_allclose(sv[1], base[1], rtol=1e-5)  # no SV: unchanged
    assert np.all(focal[1, 1:] < 0.5 * base[1, 1:])  # the easy row fades
    assert np.all(hm[1] == 0) and np.allclose(hm[0], base[0], rtol=1e-5)


def test_arcface_exact_and_straight_through_target_gradients():
    theta = np.array([0.3, 1.0, 2.0])
    grads = gradients.arcface_target_gradients(theta, margin=0.5)
    exact, straight = grads.values()
    want = np.cos(0.5) + np.sin(0.5) * np.cos(theta) / np.sin(theta)
    np.testing.assert_allclose(exact, want, rtol=1e-4)
    np.testing.assert_allclose(straight, 1.0)


@pytest.fixture
def figure_dirs(monkeypatch, tmp_path):
    monkeypatch.setenv(figures.DATA_ENV, str(tmp_path / "tfds"))
    monkeypatch.setenv("MARGIN_JAX_RUNS", str(tmp_path / "runs"))
    return tmp_path


def test_hypersphere_run_embeds_every_digit_and_is_cached(figure_dirs):
    from figures import hypersphere

    run = hypersphere.train_run("arcface", 2, steps=2)
    assert run.train_embeddings.shape[1] == 2 and run.centres.shape == (7, 2)
    assert set(run.train_labels) == set(range(7))
    assert set(run.held_out_labels) == {7, 8, 9}
    assert 0.0 <= run.results["verification_accuracy"] <= 1.0
    again = hypersphere.train_run("arcface", 2, steps=2)  # resumed, not retrained
    np.testing.assert_array_equal(again.train_embeddings, run.train_embeddings)
    assert "| ArcFace |" in hypersphere.accuracy_table({("arcface", 2): run})


def test_support_vector_snapshots_follow_training(figure_dirs):
    from figures import support_vectors

    snapshots, loss = support_vectors.train_snapshots(steps=2, every=1)
    assert [s.step for s in snapshots] == [0, 1, 2]
    assert snapshots[0].cos.shape == (21, 7)
    assert list(snapshots[0].labels) == sorted(snapshots[0].labels)
    assert loss["name"] == "sv_softmax"
    assert snapshots[0].sv_fraction > 0.5  # at initialisation nearly all are SVs
    assert support_vectors.nearest(snapshots, (0.0, 1.0)) == [
        snapshots[0],
        snapshots[-1],
    ]
    chosen = support_vectors.with_support_vectors(snapshots, 0.0)
    assert chosen.sv_fraction == min(s.sv_fraction for s in snapshots)
