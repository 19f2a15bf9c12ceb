"""Center loss + softmax and the softmax + triplet two-head model in train/."""

import jax
import numpy as np
import pytest
from flax import nnx

import margin_jax as mj
from train import heads, input_pipeline, losses_table, models, parallel, train
from train.configs import center_softmax, softmax_triplet, tiny

NUM_CLASSES = 5


def _config(name):
    config = tiny.get_config()
    family = {"center_softmax": center_softmax, "softmax_triplet": softmax_triplet}
    source = family[name].get_config()
    for key in ("loss", "model", "sampler"):
        config[key] = source[key]
    if name == "center_softmax":
        config.loss.lambda_ = 0.1  # large enough to matter in two steps
    return config


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    # P x K = 4 x 4 in shuffled order, so positives span devices.
    labels = rng.permutation(np.repeat(np.arange(4), 4)).astype(np.int32)
    return {
        "image": rng.uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32),
        "label": labels,
    }


def _setup(config):
    tx, _ = train.create_optimizer(config)
    graphdef, _, state = train.create_train_state(config, (8, 8, 1), NUM_CLASSES, tx)
    return tx, graphdef, state


def _steps_on(devices, config, batch, steps=2):
    tx, graphdef, state = _setup(config)
    loss_fn = heads.make_loss_fn(config, num_classes=NUM_CLASSES)
    p_step = train.make_p_train_step(graphdef, tx, loss_fn, devices)
    p_state = parallel.replicate(state, devices)
    for _ in range(steps):  # the second step sees updated centres / parameters
        p_state, metrics = p_step(p_state, input_pipeline.shard(batch, len(devices)))
    return jax.device_get(parallel.unreplicate((p_state, metrics)))


def _close(a, b):
    # float32 sums in another order; tolerance relative to the array's scale.
    scale = max(1.0, float(np.max(np.abs(b)))) if np.size(b) else 1.0
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("name", ["center_softmax", "softmax_triplet"])
def test_pmap_step_equals_single_device(name):
    config = _config(name)
    batch = _batch()
    state8, metrics8 = _steps_on(jax.local_devices(), config, batch)
    state1, metrics1 = _steps_on(jax.local_devices()[:1], config, batch)
    assert int(state8.step) == 2
    for field in ("params", "batch_stats", "opt_state", "loss_state", "rng"):
        jax.tree.map(_close, getattr(state8, field), getattr(state1, field))
    assert set(metrics8) == set(metrics1)
    for key in metrics1:
        _close(metrics8[key], metrics1[key])
    assert np.isfinite(metrics8["loss"]) and metrics8["loss"] > 0


def test_centres_are_loss_state_moved_by_the_update_rule():
    config = _config("center_softmax")
    tx, graphdef, state = _setup(config)
    assert isinstance(state.loss_state, mj.CenterState)
    assert state.loss_state.centers.shape == (NUM_CLASSES, config.embedding_dim)
    # The optimiser sees the parameters only: same structure as tx.init(params).
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(
        tx.init(state.params)
    )
    assert not any(
        "center" in jax.tree_util.keystr(path)
        for path, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
    )
    batch = _batch(1)
    # The embeddings the first step sees (train mode, global batch statistics).
    devices = jax.local_devices()
    embed = jax.pmap(
        lambda p, s, x: nnx.merge(graphdef, p, s)(x),
        axis_name=parallel.AXIS_NAME,
        devices=devices,
    )
    sharded = input_pipeline.shard(batch, len(devices))
    emb = embed(
        parallel.replicate(state.params, devices),
        parallel.replicate(state.batch_stats, devices),
        sharded["image"],
    ).reshape(16, -1)
    _, hyperparameters = losses_table.config_loss(config.loss)
    expected = mj.update_centers(
        state.loss_state, emb, batch["label"], alpha=hyperparameters["alpha"]
    )
    after, _ = _steps_on(devices, config, batch, steps=1)
    _close(after.loss_state.centers, np.asarray(expected.centers))
    assert np.any(after.loss_state.centers != 0)
    present = np.unique(batch["label"])
    absent = np.setdiff1d(np.arange(NUM_CLASSES), present)
    np.testing.assert_array_equal(after.loss_state.centers[absent], 0.0)


def test_two_head_model_gives_normalised_embeddings_and_logits():
    config = _config("softmax_triplet")
    model = models.create_model(config, (8, 8, 1), NUM_CLASSES)
    images = np.random.default_rng(2).uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)
    emb, logits = models.embed_and_classify(model, images)
    assert emb.shape == (3, config.embedding_dim) and logits.shape == (3, NUM_CLASSES)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(model(images), emb)
    np.testing.assert_allclose(model.classify(images), logits)


@pytest.mark.parametrize("name", ["center_softmax", "softmax_triplet"])
def test_two_steps_end_to_end_on_8_devices(name, tmp_path):
    assert jax.local_device_count() == 8
    config = _config(name)
    config.num_train_steps = 2
    config.data_dir = str(tmp_path / "tfds")
    results = train.train_and_evaluate(config, str(tmp_path / "work"))
    assert 0.0 <= results["verification_accuracy"] <= 1.0
    assert (tmp_path / "work" / "eval.json").exists()


def test_softmax_triplet_needs_pk_sampler():
    config = _config("softmax_triplet")
    config.sampler = "random"
    with pytest.raises(ValueError, match="needs config.sampler='pk'"):
        train.validate_config(config)
    config.sampler, config.images_per_class = "pk", 1
    with pytest.raises(ValueError, match="images_per_class must be >= 2"):
        train.validate_config(config)


def test_two_head_losses_and_models_go_together():
    config = _config("softmax_triplet")
    config.model = "small_cnn"
    with pytest.raises(ValueError, match="needs a two-head model"):
        train.validate_config(config)
    config = tiny.get_config()
    config.model = "small_cnn_two_head"
    with pytest.raises(ValueError, match="cannot use a two-head model"):
        train.validate_config(config)


def test_string_hyperparameters_are_checked():
    with pytest.raises(ValueError, match="valid choices for config.loss.classifier"):
        losses_table.get_loss("center_softmax", {"classifier": "arcface"})
    with pytest.raises(ValueError, match="semi_hard, batch_hard, batch_all"):
        losses_table.get_loss("softmax_triplet", {"mining": "hard"})
