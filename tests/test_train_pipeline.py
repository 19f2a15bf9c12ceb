"""End to end: train.train_and_evaluate and the CLI on 8 fake CPU devices."""

import json
import os
import subprocess

import jax
import numpy as np
import pytest

from tests import helpers
from train import heads, input_pipeline, parallel, restore, train
from train.configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    input_pipeline.open_source("margin_jax_digits", path)  # prepare once
    return path


def _config(data_dir, **overrides):
    config = tiny.get_config()
    config.data_dir = data_dir
    config.update(overrides)
    return config


def test_two_steps_end_to_end_on_8_devices(data_dir, tmp_path):
    assert jax.local_device_count() == 8
    config = _config(data_dir, num_train_steps=2, plots=True)
    results = train.train_and_evaluate(config, str(tmp_path))
    assert 0.0 <= results["verification_accuracy"] <= 1.0
    for name in ("eval.json", "report.md", "roc.png", "embeddings.png"):
        assert (tmp_path / name).exists(), name
    assert [r["step"] for r in helpers.metrics_records(tmp_path)] == [1, 2]
    assert set(json.loads((tmp_path / "eval.json").read_text())) >= {
        "verification_accuracy",
        "tar_at_far",
        "recall_at_k",
        "map_at_r",
        "nmi",
    }


def _param_leaves(model):
    from flax import nnx

    return jax.tree.leaves(nnx.state(model, nnx.Param))


def test_restore_model_latest_a_step_or_the_initialisation(data_dir, tmp_path):
    config = _config(data_dir, num_train_steps=4, checkpoint_every_steps=2)
    train.train_and_evaluate(config, str(tmp_path))
    latest = restore.restore_model(config, str(tmp_path), (8, 8, 1))
    _, state = helpers.final_state(str(tmp_path), config)
    for a, b in zip(_param_leaves(latest), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)
    tx, _ = train.create_optimizer(config)
    _, _, initial = train.create_train_state(config, (8, 8, 1), 7, tx)
    at_0 = restore.restore_model(config, str(tmp_path), (8, 8, 1), step=0)
    for a, b in zip(_param_leaves(at_0), jax.tree.leaves(initial.params), strict=True):
        np.testing.assert_array_equal(a, b)
    at_2 = restore.restore_model(config, str(tmp_path), (8, 8, 1), step=2)
    assert not np.array_equal(at_2.head.weight[...], latest.head.weight[...])
    images = input_pipeline.preprocess(np.zeros((3, 8, 8, 1), np.uint8))
    assert latest(images).shape == (3, config.embedding_dim)
    with pytest.raises(FileNotFoundError, match=r"at step 3 .*saved steps: \[2, 4\]"):
        restore.restore_model(config, str(tmp_path), (8, 8, 1), step=3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No checkpoint in"):
        restore.restore_model(config, str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no run directory"):
        restore.restore_model(config, str(tmp_path / "typo"), step=0)


def test_to_devices_places_the_state_as_the_step_returns_it(data_dir):
    """Same placement in and out: the pmapped step compiles once, not twice."""
    config = _config(data_dir)
    devices = jax.local_devices()
    tx, _ = train.create_optimizer(config)
    graphdef, _, state = train.create_train_state(config, (8, 8, 1), 7, tx)
    p_state = parallel.to_devices(state, devices)
    placed = [x.sharding for x in jax.tree.leaves(p_state)]  # before donation
    p_step = train.make_p_train_step(
        graphdef, tx, heads.make_loss_fn(config, 7), devices, num_classes=7
    )
    data, _ = train.load_data(config)
    batch = {"image": data.images[:16], "label": data.labels[:16]}
    out, _ = p_step(p_state, input_pipeline.shard(batch, len(devices)))
    assert placed == [x.sharding for x in jax.tree.leaves(out)]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    config = _config(
        data_dir, num_train_steps=4, checkpoint_every_steps=1, learning_rate=1e38
    )
    with pytest.raises(train.NonFiniteLossError, match="last good checkpoint"):
        train.train_and_evaluate(config, str(tmp_path))
    step, state = helpers.final_state(str(tmp_path), config)
    assert step is not None
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))


def test_bad_choices_list_valid_ones(data_dir, tmp_path):
    config = _config(data_dir)
    config.loss.name = "arcfac"
    with pytest.raises(ValueError, match="valid choices for config.loss.name"):
        train.train_and_evaluate(config, str(tmp_path))
    config = _config(data_dir, optimizer="adam")
    with pytest.raises(ValueError, match="sgd, adamw"):
        train.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.loss.name=nope", "valid choices for config.loss.name"),
        ("--config.loss.scael=1", "under its name: --config.loss.arcface.scael"),
        ("--config.val_targets=('nope/lfw.bin',)", "config.val_targets: no file"),
        ("--config.dataset=insightface_recordio/16x16", "train.prepare_recordio"),
    ],
)
def test_cli_bad_override_fails_with_choices(tmp_path, override, message):
    proc = subprocess.run(
        helpers.train_main_command(
            tmp_path, f"--config.data_dir={tmp_path / 'tfds'}", override
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode != 0
    assert message in proc.stderr


def test_resuming_a_workdir_of_another_model_says_so(data_dir, tmp_path):
    config = tiny.get_config()
    config.data_dir = data_dir
    config.num_train_steps = 2
    train.train_and_evaluate(config, str(tmp_path))
    config.width = 8  # another model in the same workdir
    config.num_train_steps = 4
    with pytest.raises(ValueError, match="written by another model or config"):
        train.train_and_evaluate(config, str(tmp_path))
