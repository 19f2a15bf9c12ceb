"""Every documented error: clear, early, and naming the argument and shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import margin_jax as mj
from tests.helpers import LOSSES

NAMES = sorted(LOSSES)
COS = jnp.full((4, 5), 0.1)
LABELS = jnp.array([0, 1, 2, 3])


@pytest.mark.parametrize("name", NAMES)
def test_wrong_rank(name):
    arg = "logits" if name in ("focal", "hard_mining", "softmax") else "cos"
    with pytest.raises(ValueError, match=rf"`{arg}` must have rank 2.*\(20,\)"):
        LOSSES[name](COS.reshape(-1), LABELS)


@pytest.mark.parametrize("name", NAMES)
def test_mismatched_batch(name):
    with pytest.raises(
        ValueError, match=r"`labels` must have shape \[B\] = \(4,\).*\(3,\)"
    ):
        LOSSES[name](COS, LABELS[:3])


@pytest.mark.parametrize("name", NAMES)
def test_float_labels(name):
    with pytest.raises(TypeError, match=r"`labels` must be an integer array.*float32"):
        LOSSES[name](COS, LABELS.astype(jnp.float32))


@pytest.mark.parametrize("name", NAMES)
def test_non_float_cos(name):
    with pytest.raises(TypeError, match=r"must be a floating-point array.*int32"):
        LOSSES[name](jnp.ones((4, 5), jnp.int32), LABELS)


@pytest.mark.parametrize("name", NAMES)
def test_labels_out_of_range_eager(name):
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 5\).*\[0, 7\]"):
        LOSSES[name](COS, jnp.array([0, 1, 7, 3]))
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 5\).*\[-1, 3\]"):
        LOSSES[name](COS, jnp.array([0, 1, -1, 3]))


def test_labels_out_of_range_under_jit_is_not_checked_but_runs():
    # Documented as undefined under jit: it must not raise at trace time.
    out = jax.jit(mj.cosface_loss)(COS, jnp.array([0, 1, 7, 3]))
    assert out.shape == (4,)


@pytest.mark.parametrize("name", NAMES)
def test_bad_where(name):
    with pytest.raises(TypeError, match=r"`where` must be a boolean array"):
        LOSSES[name](COS, LABELS, where=jnp.ones(4))
    with pytest.raises(
        ValueError, match=r"`where` must have shape \[B\] = \(4,\).*\(5,\)"
    ):
        LOSSES[name](COS, LABELS, where=jnp.ones(5, bool))


@pytest.mark.parametrize("margin", [4.0, np.float32(4), jnp.array(4), True, "4"])
def test_sphereface_margin_must_be_python_int(margin):
    with pytest.raises(TypeError, match=r"`margin` must be a Python int"):
        mj.sphereface_loss(COS, LABELS, margin=margin)
    with pytest.raises(TypeError, match=r"`margin` must be a Python int"):
        mj.sphereface_psi(jnp.array([0.5]), margin=margin)


def test_sphereface_margin_must_be_positive():
    with pytest.raises(ValueError, match=r"`margin` must be >= 1, got 0"):
        mj.sphereface_loss(COS, LABELS, margin=0)


def test_sphereface_norm_and_scale_exclusive():
    with pytest.raises(ValueError, match=r"either `feature_norm`.*or\s+`scale`"):
        mj.sphereface_loss(COS, LABELS, feature_norm=jnp.ones(4), scale=64.0)
    with pytest.raises(ValueError, match=r"`feature_norm` must have rank 1"):
        mj.sphereface_loss(COS, LABELS, feature_norm=jnp.ones((4, 1)))


def test_per_example_scale_shape():
    with pytest.raises(
        ValueError, match=r"`scale` must be a scalar or have shape \[B\]"
    ):
        mj.normface_loss(COS, LABELS, scale=jnp.ones(3))


def test_unknown_margin_type_and_mode():
    with pytest.raises(ValueError, match=r"`margin_type` must be one of.*'sphereface'"):
        mj.sv_softmax_loss(COS, LABELS, margin_type="sphereface")
    with pytest.raises(
        ValueError, match=r"`mode` must be one of \('adaptive', 'fixed'\)"
    ):
        mj.mv_softmax_loss(COS, LABELS, mode="linear")


def test_eqm_requires_its_hyperparameters():
    with pytest.raises(TypeError, match="t1"):
        mj.eqm_loss(COS, LABELS, scale=64.0, t2=0.2)


def test_cosine_logits_errors():
    with pytest.raises(ValueError, match=r"must share D.*\(3, 4\).*\(5, 6\)"):
        mj.cosine_logits(jnp.ones((3, 4)), jnp.ones((5, 6)))
    with pytest.raises(ValueError, match=r"`weights` must have rank 2"):
        mj.cosine_logits(jnp.ones((3, 4)), jnp.ones(4))
    with pytest.raises(TypeError, match=r"`embeddings` must be a floating-point"):
        mj.cosine_logits(jnp.ones((3, 4), jnp.int32), jnp.ones((5, 4)))


def test_adacos_errors():
    with pytest.raises(ValueError, match=r"`num_classes` must be an int >= 3"):
        mj.adacos_fixed_scale(2)
    with pytest.raises(ValueError, match=r"`labels` must have shape"):
        mj.adacos_dynamic_scale(COS, LABELS[:2], 10.0)


def test_hard_mining_mask_errors():
    with pytest.raises(ValueError, match=r"`losses` must have rank 1"):
        mj.hard_mining_mask(COS)
