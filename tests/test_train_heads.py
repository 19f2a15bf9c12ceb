"""Classifier heads in train/: dense, chunked and sharded (+ Partial FC)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from train import (
    checkpoint,
    heads,
    input_pipeline,
    losses_table,
    models,
    parallel,
    restore,
    train,
)
from train.configs import tiny

NUM_CLASSES = 7


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    input_pipeline.open_source("margin_jax_digits", path)
    return path


def _batch(seed=0, size=16):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.uniform(-1, 1, (size, 8, 8, 1)).astype(np.float32),
        "label": rng.integers(0, NUM_CLASSES, size).astype(np.int32),
    }


def _run_steps(config, devices, steps=2):
    head = config.head
    sharded = head == "sharded"
    tx, _ = train.create_optimizer(config)
    graphdef, _, state = train.create_train_state(
        config, (8, 8, 1), NUM_CLASSES, tx, num_shards=len(devices) if sharded else None
    )
    loss_fn = heads.make_loss_fn(config, num_classes=NUM_CLASSES)
    p_step = train.make_p_train_step(
        graphdef, tx, loss_fn, devices, head=head, num_classes=NUM_CLASSES
    )
    p_state = parallel.to_devices(state, devices, sharded=sharded)
    for step in range(steps):
        batch = input_pipeline.shard(_batch(step), len(devices))
        p_state, metrics = p_step(p_state, batch)
    state = parallel.to_host(p_state, sharded=sharded)
    if sharded:
        state = parallel.full_head(state, NUM_CLASSES)
    return jax.device_get(state), jax.device_get(parallel.unreplicate(metrics))


def _close(a, b):
    scale = max(1.0, float(np.max(np.abs(b)))) if np.size(b) else 1.0
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize(
    "head,loss",
    [
        ("chunked", "arcface"),
        ("chunked", "sv_softmax"),
        ("sharded", "arcface"),
        ("sharded", "sphereface"),
    ],
)
def test_head_step_equals_dense_single_device(head, loss):
    config = tiny.get_config()
    config.loss = {"name": loss}
    config.head_chunk_size = 3
    dense_state, dense_metrics = _run_steps(config, jax.local_devices()[:1])
    config.head = head
    state, metrics = _run_steps(config, jax.local_devices())
    jax.tree.map(_close, state.params, dense_state.params)
    jax.tree.map(_close, state.batch_stats, dense_state.batch_stats)
    for key in ("loss", "accuracy"):
        _close(metrics[key], dense_metrics[key])


def test_top1_predictions_sharded_equals_dense():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, 8)).astype(np.float32)
    w = rng.normal(size=(21, 8)).astype(np.float32)
    dense = np.argmax(x @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T, axis=1)
    np.testing.assert_array_equal(heads.top1_predictions(x, w, chunk_size=4), dense)
    # Padding rows that would win if they counted.
    x = np.abs(x)
    w = -np.abs(w)
    w[5] = 0.1
    dense = np.argmax(x @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T, axis=1)
    padded = np.concatenate([w, np.full((3, 8), 10.0, np.float32)]).reshape(8, 3, 8)

    def local(x, w):
        return heads.top1_predictions(x, w, chunk_size=2, axis_name="d", num_classes=21)

    out = jax.pmap(local, axis_name="d")(x.reshape(8, 2, 8), padded)
    for device in range(8):  # every device gets the whole batch's predictions
        np.testing.assert_array_equal(out[device], dense)


def test_head_weight_is_the_models_head_weight_only():
    """W is model.head.weight, in params and optimiser slots alike; a backbone
    block that happens to be called ``head`` is not W."""

    class Backbone(nnx.Module):
        def __init__(self, rngs):
            self.head = models.MarginHead(3, 4, rngs=rngs)

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.backbone = Backbone(rngs)
            self.head = models.MarginHead(NUM_CLASSES, 4, rngs=rngs)

    model = Model(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    tree = (params, optax.adamw(1e-3).init(params))  # W, Adam's mu and nu
    selected = heads.map_head(lambda w: True, tree, params, lambda x: False)
    assert [np.shape(x) for x in _hits(tree, selected)] == [(NUM_CLASSES, 4)] * 3
    with pytest.raises(ValueError, match="No classifier head"):
        heads.head_mask(nnx.state(model.backbone.head, nnx.Param))
    config = tiny.get_config()
    for name in ("small_cnn", "small_cnn_two_head"):
        config.model = name
        model = models.create_model(config, (8, 8, 1), NUM_CLASSES)
        params = nnx.state(model, nnx.Param)
        (w,) = _hits(params, heads.head_mask(params))
        np.testing.assert_array_equal(w, model.head.weight[...])


def _hits(tree, selected):
    """The leaves of ``tree`` where the same-shaped ``selected`` is True."""
    leaves = zip(jax.tree.leaves(tree), jax.tree.leaves(selected), strict=True)
    return [x for x, hit in leaves if hit]


def test_sharded_training_reaches_dense_accuracy(data_dir, tmp_path):
    # Same data, init and schedule on 8 fake devices; only the head differs.
    # float32 sums in another order make the runs drift apart slowly, so the
    # loss curves agree closely and the held-out metrics within eval noise.
    results, losses = {}, {}
    for head in ("dense", "sharded"):
        config = tiny.get_config()
        config.update(
            data_dir=data_dir,
            head=head,
            num_train_steps=30,
            batch_size=32,
            head_chunk_size=2,
            eval_num_pairs=1000,
        )
        workdir = tmp_path / head
        results[head] = train.train_and_evaluate(config, str(workdir))
        with open(workdir / "metrics.jsonl") as f:
            losses[head] = [json.loads(line)["loss"] for line in f]
    np.testing.assert_allclose(losses["sharded"], losses["dense"], rtol=0.02)
    for key in ("verification_accuracy", "precision_at_1", "map_at_r", "nmi"):
        assert abs(results["sharded"][key] - results["dense"][key]) < 0.03, key


def test_sharded_head_is_checkpointed_and_resumes(data_dir, tmp_path):
    config = tiny.get_config()
    config.update(
        data_dir=data_dir, head="sharded", num_train_steps=4, checkpoint_every_steps=2
    )
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    train.train_and_evaluate(config, whole)
    assert train.train_and_evaluate(config, parts, max_steps=3) == {}
    train.train_and_evaluate(config, parts)

    def final(workdir):
        tx, _ = train.create_optimizer(config)
        _, _, like = train.create_train_state(
            config, (8, 8, 1), NUM_CLASSES, tx, num_shards=8
        )
        ckpt = checkpoint.Checkpointer(
            os.path.join(workdir, "checkpoints"), every=1, keep=5
        )
        try:
            return jax.device_get(ckpt.restore(like))
        finally:
            ckpt.close()

    a, b = final(whole), final(parts)
    head_a = a.params["head"]["weight"][...]
    assert head_a.shape == (8, 1, config.embedding_dim)  # one class row per device
    jax.tree.map(np.testing.assert_array_equal, a, b)
    # restore_model re-joins the shards into W [C, D] ...
    model = restore.restore_model(config, whole, (8, 8, 1))
    np.testing.assert_array_equal(
        model.head.weight[...], head_a.reshape(-1, config.embedding_dim)[:NUM_CLASSES]
    )
    # ... and on another device count says why it cannot.
    script = (
        "import sys; from train import restore; from train.configs import tiny\n"
        "c = tiny.get_config()\n"
        f"c.update(data_dir={data_dir!r}, head='sharded', num_train_steps=4)\n"
        f"restore.restore_model(c, {whole!r}, (8, 8, 1))\n"
    )
    env = dict(os.environ, XLA_FLAGS="")  # one device
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True
    )
    assert done.returncode != 0
    assert "does not fit 1 local devices" in done.stderr


def test_partial_fc_head_trains(data_dir, tmp_path):
    config = tiny.get_config()
    config.update(
        data_dir=data_dir, head="sharded", partial_fc_rate=0.5, num_train_steps=3
    )
    config.num_train_classes = 7
    results = train.train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(results["verification_accuracy"])


def test_bad_head_choices_list_valid_ones():
    config = tiny.get_config()
    config.head = "sparse"
    with pytest.raises(
        ValueError, match="valid choices for config.head: dense, chunked, sharded"
    ):
        train.validate_config(config)
    config.head = "chunked"
    config.loss = {"name": "center_softmax"}
    with pytest.raises(
        ValueError,
        match=r"config.loss.name choices with "
        r"config.head='chunked': adacos, adacos_fixed, arcface, combined",
    ):
        train.validate_config(config)
    assert "arcface" in [k for k, v in losses_table.LOSSES.items() if v.stages]


def test_head_chunk_size_zero_is_the_memory_budget_and_negative_says_so():
    config = tiny.get_config()
    config.head = "chunked"
    assert config.head_chunk_size == 0
    train.validate_config(config)
    config.head_chunk_size = -1
    with pytest.raises(ValueError, match=r"config.head_chunk_size must be an int >= 0"):
        train.validate_config(config)
