"""Every loss-family config runs end to end (2 steps, 8 fake devices, report),
on the digits base (``train/configs/<family>.py:digits``)."""

import importlib
import json
import os

import jax
import numpy as np
import pytest

from train import input_pipeline, train

CONFIG_DIR = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "train", "configs"
)
# Every loss-family config (a `_family.with_loss` file), on the digits base;
# the default (glyphs) job runs in test_glyphs.py, face112 in test_train_iresnet.
FAMILIES = sorted(
    name[:-3]
    for name in os.listdir(CONFIG_DIR)
    if name.endswith(".py")
    and "with_loss(" in open(os.path.join(CONFIG_DIR, name)).read()
    and not name.startswith("_")
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    input_pipeline.open_source("margin_jax_digits", path)
    return path


def _small(config, data_dir):
    """The family's config at smoke size: tiny model, 2 steps, small evaluation."""
    config.update(
        data_dir=data_dir,
        width=4,
        num_train_steps=2,
        warmup_steps=1,
        log_every_steps=1,
        checkpoint_every_steps=2,
        eval_num_pairs=200,
        tensorboard=False,
        progress_bar=False,
        plots=False,
    )
    config.batch_size = 16
    if config.sampler == "pk":
        config.images_per_class = 4  # P = 4 classes x K = 4 images
    config.embedding_dim = 8
    return config


@pytest.mark.parametrize("family", FAMILIES)
def test_family_config_runs_end_to_end_on_8_devices(family, data_dir, tmp_path):
    assert jax.local_device_count() == 8
    module = importlib.import_module(f"train.configs.{family}")
    config = _small(module.get_config("digits"), data_dir)
    assert config.dataset == "margin_jax_digits"
    results = train.train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(results["verification_accuracy"])
    assert (tmp_path / "eval.json").exists() and (tmp_path / "report.md").exists()
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in records)


def test_bf16_compute_and_periodic_evaluation(data_dir, tmp_path):
    module = importlib.import_module("train.configs.digits")
    config = _small(module.get_config(), data_dir)
    config.update(compute_dtype="bfloat16", num_train_steps=3, eval_every_steps=1)
    results = train.train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(results["verification_accuracy"])
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    evals = [r for r in records if "eval_verification_accuracy" in r]
    assert [r["step"] for r in evals] == [1, 2]  # the final one goes to eval.json
    assert all(0 <= r["eval_recall_at_1"] <= 1 for r in evals)
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)


def test_unknown_compute_dtype_lists_choices(data_dir, tmp_path):
    module = importlib.import_module("train.configs.digits")
    config = _small(module.get_config(), data_dir)
    config.compute_dtype = "float8"
    with pytest.raises(ValueError, match="config.compute_dtype: float32, bfloat16"):
        train.train_and_evaluate(config, str(tmp_path))
