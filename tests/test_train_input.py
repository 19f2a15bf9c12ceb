"""train.input_pipeline: the digits builder, the open-set split, the samplers."""

import numpy as np
import pytest

from train import input_pipeline


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    return input_pipeline.load_dataset("margin_jax_digits", data_dir)


def test_digits_builder_reads_back(digits):
    assert digits.images.shape == (1797, 8, 8, 1)
    assert digits.images.dtype == np.uint8 and digits.images.max() == 255
    assert sorted(np.unique(digits.labels)) == list(range(10))


def test_open_set_split_by_class(digits):
    train, held_out = input_pipeline.open_set_split(digits, 7)
    assert set(train.labels) == set(range(7))
    assert set(held_out.labels) == {7, 8, 9}
    assert len(train) + len(held_out) == len(digits)


def test_not_prepared_fails_fast_with_message(tmp_path):
    with pytest.raises(input_pipeline.DatasetNotPreparedError, match="tfds build"):
        input_pipeline.load_dataset("mnist", str(tmp_path))


@pytest.mark.parametrize("sampler", ["random", "pk"])
def test_batches_are_a_function_of_seed_and_step(digits, sampler):
    labels = digits.labels
    make = lambda seed: input_pipeline.BatchSampler(  # noqa: E731
        labels, batch_size=32, seed=seed, sampler=sampler, images_per_class=4
    )
    a, b, c = make(0), make(0), make(1)
    for step in (0, 5, 200):
        np.testing.assert_array_equal(a(step), b(step))
        assert len(a(step)) == 32
    assert not np.array_equal(a(0), c(0))
    if sampler == "pk":
        _, counts = np.unique(labels[a(3)], return_counts=True)
        assert counts.tolist() == [4] * 8


def test_unknown_sampler_lists_choices(digits):
    with pytest.raises(ValueError, match="random, pk"):
        input_pipeline.BatchSampler(digits.labels, batch_size=8, seed=0, sampler="x")


def test_shard_splits_the_global_batch():
    batch = {"image": np.zeros((16, 8, 8, 1)), "label": np.arange(16)}
    sharded = input_pipeline.shard(batch, 8)
    assert sharded["image"].shape == (8, 2, 8, 8, 1)
    np.testing.assert_array_equal(sharded["label"].reshape(-1), np.arange(16))


def test_process_slices_tile_the_global_batch():
    indices = np.arange(100, 124)
    parts = [input_pipeline.process_slice(indices, p, 4) for p in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), indices)
    assert {len(p) for p in parts} == {6}
    with pytest.raises(ValueError, match="not divisible by 5 processes"):
        input_pipeline.process_slice(indices, 0, 5)
