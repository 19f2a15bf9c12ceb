"""The pmapped train step equals one device on the same global batch."""

import os

import jax
import numpy as np
import pytest

from train import heads, input_pipeline, losses_table, parallel, train
from train.configs import tiny

NUM_CLASSES = 5


def _step_on(devices, config, batch):
    tx, _ = train.create_optimizer(config)
    graphdef, _, state = train.create_train_state(config, (8, 8, 1), NUM_CLASSES, tx)
    loss_fn = heads.make_loss_fn(config, num_classes=NUM_CLASSES)  # takes rng too
    p_step = train.make_p_train_step(graphdef, tx, loss_fn, devices)
    p_state = parallel.replicate(state, devices)
    for _ in range(2):  # the second step sees updated batch and loss statistics
        p_state, metrics = p_step(p_state, input_pipeline.shard(batch, len(devices)))
    return jax.device_get(parallel.unreplicate((p_state, metrics)))


def _close(a, b):
    # float32 sums in another order; tolerance relative to the array's scale.
    scale = max(1.0, float(np.max(np.abs(b)))) if np.size(b) else 1.0
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize(
    "loss", [{"name": "arcface"}, {"name": "adacos"}, {"name": "curricularface"}]
)
def test_pmap_step_equals_single_device(loss):
    config = tiny.get_config()
    config.loss = loss
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32),
        "label": rng.integers(0, NUM_CLASSES, 16).astype(np.int32),
    }
    (state8, metrics8) = _step_on(jax.local_devices(), config, batch)
    (state1, metrics1) = _step_on(jax.local_devices()[:1], config, batch)
    assert int(state8.step) == 2
    for name in ("params", "batch_stats", "opt_state", "loss_state", "rng"):
        jax.tree.map(_close, getattr(state8, name), getattr(state1, name))
    for key in metrics1:
        _close(metrics8[key], metrics1[key])


def test_unknown_loss_lists_valid_choices():
    with pytest.raises(ValueError, match="arcface, center_softmax, combined, cosface"):
        losses_table.get_loss("arcfac")


def test_unknown_loss_hyperparameter_lists_valid_ones():
    with pytest.raises(ValueError, match="scale, margin, easy_margin"):
        losses_table.get_loss("arcface", {"scael": 1.0})


@pytest.mark.parametrize("name", sorted(losses_table.LOSSES))
def test_every_loss_runs_and_keeps_its_state_shape(name):
    spec = losses_table.get_loss(name)
    rng = np.random.default_rng(1)
    inputs = losses_table.LossInputs(
        rng.normal(size=(6, 4)).astype(np.float32),
        rng.normal(size=(NUM_CLASSES, 4)).astype(np.float32),
        rng.integers(0, NUM_CLASSES, 6).astype(np.int32),
        rng.normal(size=(6, NUM_CLASSES)).astype(np.float32),  # two-head logits
    )
    state = spec.init_state(NUM_CLASSES, 4)
    loss, new_state = jax.jit(spec.fn, static_argnames="axis_name")(
        inputs, state, step=np.int32(3), axis_name=None
    )
    # Per-example [B]; a loss of the whole batch (two-head triplet) is a scalar.
    expected = () if losses_table.LOSSES[name].two_head else (6,)
    assert loss.shape == expected and np.all(np.isfinite(loss))
    assert jax.tree.structure(new_state) == jax.tree.structure(state)


def test_every_config_file_is_valid():
    import glob
    import importlib

    root = os.path.join(os.path.dirname(os.path.dirname(__file__)), "train", "configs")
    names = [
        os.path.basename(p)[:-3]
        for p in glob.glob(os.path.join(root, "*.py"))
        if not os.path.basename(p).startswith("_")
    ]
    assert {"default", "tiny", "cosface", "sphereface", "adacos"} <= set(names)
    for name in names:
        train.validate_config(
            importlib.import_module(f"train.configs.{name}").get_config()
        )


def test_default_config_takes_any_loss_by_name():
    from train.configs import default, digits

    for name in losses_table.LOSSES:
        config = default.get_config()
        config.loss.name = name  # what --config.loss.name=<name> does
        chosen, hyper = losses_table.config_loss(config.loss)
        assert chosen == name
        assert hyper == dict(default.LOSS_HYPERPARAMETERS.get(name, {}))
        heads.make_loss_fn(config, num_classes=10)  # binds without a stray key
    assert losses_table.config_loss(digits.get_config().loss)[1] == {
        "scale": 16.0,
        "margin": 0.2,
    }
    # Flat keys win over the entry; a wrong one is still an error.
    config = default.get_config()
    config.loss.margin = 0.4
    assert losses_table.config_loss(config.loss)[1]["margin"] == 0.4
    config.loss.name = "softmax"
    with pytest.raises(ValueError, match=r"Unknown hyperparameter\(s\) \['margin'\]"):
        heads.make_loss_fn(config)
    with pytest.raises(ValueError, match="config.loss needs a 'name'"):
        losses_table.config_loss({"margin": 0.5})


def test_config_variants_and_bases_name_the_choices():
    from train.configs import _family, cosface, default

    assert default.get_config("quick").num_train_steps < 100
    with pytest.raises(ValueError, match="valid choices: quick"):
        default.get_config("fast")
    assert cosface.get_config("digits").dataset == "margin_jax_digits"
    assert cosface.get_config().dataset == "margin_jax_glyphs"
    with pytest.raises(ValueError, match="valid choices: default, digits"):
        _family.with_loss("cosface", "faces")


def test_bad_random_affine_is_refused():
    config = tiny.get_config()
    config.random_affine.rotation = -1.0
    with pytest.raises(ValueError, match="config.random_affine takes rotation"):
        train.validate_config(config)
    config = tiny.get_config()
    config.random_affine.shear = 0.1
    with pytest.raises(ValueError, match="config.random_affine takes rotation"):
        train.validate_config(config)
