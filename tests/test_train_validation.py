"""Verification sets during training, best/, face112's small variant, synthetic."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from margin_jax import eval as mj_eval
from tests import helpers
from train import (
    checkpoint,
    input_pipeline,
    prepare_recordio,
    recordio,
    restore,
    train,
    validation,
)
from train.configs import face112, tiny


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    input_pipeline.open_source("margin_jax_digits", path)
    return path


@pytest.fixture(scope="module")
def digit_bins(data_dir, tmp_path_factory):
    """Two verification sets of held-out digits (7-9), as the model sees them."""
    records, labels = input_pipeline.open_source("margin_jax_digits", data_dir)
    held = np.flatnonzero(labels >= 7)[:200]
    images = records.read(held)
    directory = tmp_path_factory.mktemp("bins")
    return tuple(
        helpers.pairs_bin(directory / f"{name}.bin", images, labels[held], 60, seed)
        for seed, name in enumerate(("lfw", "agedb_30"))
    )


def _config(data_dir, bins, **overrides):
    config = tiny.get_config()
    config.update(
        data_dir=data_dir,
        val_targets=bins,
        val_every_steps=2,
        num_train_steps=4,
        checkpoint_every_steps=2,
        keep_checkpoints=3,
    )
    config.update(overrides)
    return config


def _embed_fn(model):
    apply = nnx.jit(lambda m, x: m(x))

    def embed(images):
        x = validation.as_model_input(np.asarray(images), 1)
        return np.asarray(apply(model, input_pipeline.preprocess(x)))

    return embed


def test_val_targets_recorded_and_equal_to_evaluate_bin(data_dir, digit_bins, tmp_path):
    config = _config(data_dir, digit_bins, plots=True)
    results = train.train_and_evaluate(config, str(tmp_path))
    val = [r for r in helpers.metrics_records(tmp_path) if "val/mean_accuracy" in r]
    assert [r["step"] for r in val] == [2, 4]
    keys = {
        f"val/{n}/{k}"
        for n in ("lfw", "agedb_30")
        for k in ("accuracy", "accuracy_std", "xnorm", "best")
    }
    for record in val:
        assert keys <= set(record)
        model = restore.restore_model(config, str(tmp_path), step=record["step"])
        for name, path in zip(("lfw", "agedb_30"), digit_bins, strict=True):
            expected = mj_eval.evaluate_bin(path, _embed_fn(model))
            assert record[f"val/{name}/accuracy"] == pytest.approx(expected["mean"])
            assert record[f"val/{name}/accuracy_std"] == pytest.approx(expected["std"])
            assert record[f"val/{name}/xnorm"] == pytest.approx(
                expected["xnorm"], rel=1e-5
            )
    for name in ("lfw", "agedb_30"):
        accuracies = [r[f"val/{name}/accuracy"] for r in val]
        assert [r[f"val/{name}/best"] for r in val] == list(
            np.maximum.accumulate(accuracies)
        )
    # best/ holds the first step of the highest mean accuracy.
    means = [r["val/mean_accuracy"] for r in val]
    best_step = val[int(np.argmax(means))]["step"]
    assert results["best_step"] == best_step
    info = json.loads((tmp_path / "best" / "best.json").read_text())
    assert info["step"] == best_step and info["mean_accuracy"] == max(means)
    best = restore.restore_model(config, str(tmp_path / "best"))
    at_step = restore.restore_model(config, str(tmp_path), step=best_step)
    for a, b in zip(
        jax.tree.leaves(nnx.state(best)),
        jax.tree.leaves(nnx.state(at_step)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    # The final results, the report's table.
    assert results["val_targets"]["lfw"]["accuracy"] == val[-1]["val/lfw/accuracy"]
    assert "verification_accuracy" in results  # digits 7-9 are still held out
    report = (tmp_path / "report.md").read_text()
    assert "## Verification sets" in report and "| agedb_30 |" in report
    assert (tmp_path / "training.png").exists()


@pytest.mark.parametrize("workers", [0, 1])
def test_kill_and_resume_equals_uninterrupted(data_dir, digit_bins, tmp_path, workers):
    """The streamed batches, flips, loss state, val records and best/ all resume."""
    config = _config(data_dir, digit_bins, data_workers=workers, random_flip=True)
    config.loss = {"name": "adacos"}  # loss state must survive the restart too
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train.train_and_evaluate(config, str(whole))
    # "Killed" after step 3: the last checkpoint is step 2, step 3 is redone.
    assert train.train_and_evaluate(config, str(parts), max_steps=3) == {}
    assert helpers.final_state(parts, config)[0] == 2
    train.train_and_evaluate(config, str(parts))
    (step_a, state_a), (step_b, state_b) = (
        helpers.final_state(whole, config),
        helpers.final_state(parts, config),
    )
    assert step_a == step_b == 4
    jax.tree.map(np.testing.assert_array_equal, state_a, state_b)
    # Every step's record once, equal but for the timings.
    timing = ("images_per_sec", "eta_seconds")
    assert helpers.metrics_records(whole) == [
        {**r, **{k: a[k] for k in timing if k in a}}
        for r, a in zip(
            helpers.metrics_records(parts), helpers.metrics_records(whole), strict=True
        )
    ]
    assert json.loads((whole / "best" / "best.json").read_text()) == json.loads(
        (parts / "best" / "best.json").read_text()
    )


def test_every_class_needs_val_targets(data_dir, tmp_path):
    config = _config(data_dir, (), num_train_classes=10)
    with pytest.raises(ValueError, match="or all 10 with config.val_targets"):
        train.train_and_evaluate(config, str(tmp_path))


def test_missing_or_wrong_size_bin_stops_before_training(data_dir, tmp_path):
    config = _config(data_dir, (str(tmp_path / "lfw.bin"),))
    with pytest.raises(FileNotFoundError, match="config.val_targets: no file"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()
    mj_eval.write_bin(tmp_path / "big.bin", np.zeros((4, 16, 16, 3), np.uint8), [1, 0])
    config = _config(data_dir, (str(tmp_path / "big.bin"),))
    with pytest.raises(ValueError, match="holds 16x16 images but the model takes 8x8"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    (tmp_path / "x").mkdir()
    mj_eval.write_bin(tmp_path / "x/big.bin", np.zeros((2, 8, 8, 3), np.uint8), [1])
    config = _config(data_dir, (str(tmp_path / "big.bin"), str(tmp_path / "x/big.bin")))
    with pytest.raises(ValueError, match="two files share a name"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


def test_synthetic_reads_no_data_and_logs_throughput(tmp_path):
    config = tiny.get_config()
    config.update(synthetic=True, data_dir=str(tmp_path / "no_data"), num_train_steps=3)
    assert train.train_and_evaluate(config, str(tmp_path / "run")) == {}
    assert not (tmp_path / "no_data").exists()
    records = helpers.metrics_records(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["images_per_sec"] > 0 and r["eta_seconds"] >= 0 for r in records)
    assert records[-1]["eta_seconds"] == 0.0
    assert "synthetic" in (tmp_path / "run" / "report.md").read_text()


def _faces(n, size, seed):
    """Smooth RGB images; each class has its own colour pattern plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] / (size - 1)
    labels = np.arange(n) % 4
    patterns = rng.uniform(-80, 80, (4, 2, 3))
    images = []
    for c in labels:
        base = 128 + patterns[c, 0] * x[..., None] + patterns[c, 1] * y[..., None]
        images.append(np.clip(base + rng.normal(0, 8, base.shape), 0, 255))
    return np.asarray(images, np.uint8), labels


def test_face112_small_variant_trains_and_evaluates(tmp_path):
    """face112's pipeline: RecordIO -> prepare_recordio -> IResNet -> .bin sets."""
    images, labels = _faces(64, 16, 0)
    order = np.argsort(labels, kind="stable")  # insightface sets: class runs
    recordio.write_recordio(tmp_path / "train", images[order], labels[order])
    data_dir = str(tmp_path / "tfds")
    assert (
        prepare_recordio.main(
            [str(tmp_path), "--data_dir", data_dir, "--image_size", "16"]
        )
        == 0
    )
    val_images, val_labels = _faces(40, 16, 1)
    bins = (helpers.pairs_bin(tmp_path / "lfw.bin", val_images, val_labels, 20, 0),)
    config = face112.get_config()
    config.update(
        dataset="insightface_recordio/16x16",
        data_dir=data_dir,
        num_train_classes=4,  # every identity trains
        batch_size=16,
        model="iresnet18",
        width_multiplier=1 / 16,
        embedding_dim=16,
        num_train_steps=2,
        warmup_steps=1,
        log_every_steps=1,
        checkpoint_every_steps=2,
        val_targets=bins,
        val_every_steps=1,
        data_workers=1,
        tensorboard=False,
    )
    results = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert set(results["val_targets"]) == {"lfw"}
    assert "verification_accuracy" not in results  # no identity held out
    assert "## Open set" not in (tmp_path / "run" / "report.md").read_text()
    assert 0 <= results["val_targets"]["lfw"]["accuracy"] <= 1
    val = [
        r for r in helpers.metrics_records(tmp_path / "run") if "val/mean_accuracy" in r
    ]
    assert [r["step"] for r in val] == [1, 2]
    ckpt = checkpoint.Checkpointer(str(tmp_path / "run" / "best"), every=1, keep=1)
    try:
        assert ckpt.all_steps() == [results["best_step"]]
    finally:
        ckpt.close()
