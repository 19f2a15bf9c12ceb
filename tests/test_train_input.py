"""train.input_pipeline: sources, label cache, open-set split, samplers, stream."""

import io
import os

import numpy as np
import pytest

from train import input_pipeline


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    return input_pipeline.open_source("margin_jax_digits", data_dir)


def _all_images(records):
    return records.read(np.arange(len(records)))


def test_digits_source_reads_back(digits):
    records, labels = digits
    images = _all_images(records)
    assert images.shape == (1797, 8, 8, 1) and records.spec.image_shape == (8, 8, 1)
    assert images.dtype == np.uint8 and images.max() == 255
    assert labels.dtype == np.int32 and sorted(np.unique(labels)) == list(range(10))
    from sklearn.datasets import load_digits

    # The same multiset of (image, label) as scikit-learn's (tfds shuffles).
    ref = load_digits()
    ours = sorted(zip(labels.tolist(), map(bytes, images), strict=True))
    theirs = sorted(
        zip(
            ref.target.tolist(),
            map(bytes, (ref.images * 17).astype(np.uint8)[..., None]),
            strict=True,
        )
    )
    assert ours == theirs


def test_labels_come_from_the_cache_not_the_images(digits, tmp_path):
    records, labels = digits
    builder = input_pipeline.get_builder("margin_jax_digits", records.spec.data_dir)
    path = input_pipeline._labels_path(builder, "train", "label")
    assert os.path.isfile(path)
    np.testing.assert_array_equal(np.load(path), labels)
    # A second open reads the cache: a changed cache is what comes back.
    cached = np.load(path)
    np.save(path, cached[::-1].copy())
    try:
        _, again = input_pipeline.open_source(
            "margin_jax_digits", records.spec.data_dir
        )
        np.testing.assert_array_equal(again, cached[::-1])
    finally:
        np.save(path, cached)


def test_open_set_split_by_class(digits):
    _, labels = digits
    rows, remap, held = input_pipeline.open_set_split(labels, 7)
    assert set(remap) == set(range(7)) and set(labels[rows]) == set(range(7))
    assert set(labels[held]) == {7, 8, 9}
    assert len(rows) + len(held) == len(labels)
    with pytest.raises(ValueError, match=r"in \[2, 8\].*or all 10 with"):
        input_pipeline.open_set_split(labels, 10)
    rows, remap, held = input_pipeline.open_set_split(labels, 10, allow_all=True)
    assert len(rows) == len(labels) and len(held) == 0


def test_not_prepared_fails_fast_with_message(tmp_path):
    with pytest.raises(input_pipeline.DatasetNotPreparedError, match="tfds build"):
        input_pipeline.open_source("mnist", str(tmp_path))
    with pytest.raises(
        input_pipeline.DatasetNotPreparedError, match="python -m train.prepare_recordio"
    ):
        input_pipeline.open_source("insightface_recordio/16x16", str(tmp_path))


@pytest.mark.parametrize("sampler", ["random", "pk"])
def test_batches_are_a_function_of_seed_and_step(digits, sampler):
    _, labels = digits
    make = lambda seed: input_pipeline.BatchSampler(  # noqa: E731
        labels, batch_size=32, seed=seed, sampler=sampler, images_per_class=4
    )
    a, b, c = make(0), make(0), make(1)
    for step in (0, 5, 200, 3):  # out of order: the epoch cache is not state
        np.testing.assert_array_equal(a(step), b(step))
        assert len(a(step)) == 32
    assert not np.array_equal(a(0), c(0))
    if sampler == "pk":
        _, counts = np.unique(labels[a(3)], return_counts=True)
        assert counts.tolist() == [4] * 8
    else:  # an epoch visits every position once
        epoch = np.concatenate([a(s) for s in range(a.steps_per_epoch)])
        assert len(np.unique(epoch)) == len(epoch) == 32 * a.steps_per_epoch


def test_unknown_sampler_lists_choices(digits):
    with pytest.raises(ValueError, match="random, pk"):
        input_pipeline.BatchSampler(digits[1], batch_size=8, seed=0, sampler="x")


def _read(digits, **kw):
    records, labels = digits
    rows, remap, _ = input_pipeline.open_set_split(labels, 7)
    sampler = input_pipeline.BatchSampler(remap, batch_size=16, seed=3)
    train = input_pipeline.Subset(records, rows, remap)
    return input_pipeline.ReadBatch(train, sampler, **kw), train, sampler


def test_read_batch_is_the_sampled_records(digits):
    read, train, sampler = _read(digits)
    batch = read(5)
    positions = sampler(5)
    np.testing.assert_array_equal(batch["label"], train.labels[positions])
    np.testing.assert_array_equal(
        batch["image"], train.records.read(train.index[positions])
    )
    assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int32


def test_process_slices_tile_the_global_batch(digits):
    whole, _, _ = _read(digits, random_flip=True)
    parts = [
        _read(digits, process_index=p, process_count=4, random_flip=True)[0](7)
        for p in range(4)
    ]
    for key in ("image", "label"):
        np.testing.assert_array_equal(
            np.concatenate([p[key] for p in parts]), whole(7)[key]
        )
    assert {len(p["label"]) for p in parts} == {4}
    with pytest.raises(ValueError, match="not divisible by 5 processes"):
        input_pipeline.process_slice(np.arange(16), 0, 5)


def test_random_flip_mirrors_the_drawn_images(digits):
    plain, _, sampler = _read(digits)
    flipped, _, _ = _read(digits, random_flip=True)
    a, b = plain(2)["image"], flipped(2)["image"]
    mirror = input_pipeline.flips(sampler.seed, 2, 16)
    assert 0 < mirror.sum() < 16
    np.testing.assert_array_equal(b[mirror], a[mirror][:, :, ::-1])
    np.testing.assert_array_equal(b[~mirror], a[~mirror])
    np.testing.assert_array_equal(flipped(2)["image"], b)  # a function of the step


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_is_the_reads_in_order_from_any_start(digits, workers):
    read, _, _ = _read(digits, random_flip=True)
    stream = input_pipeline.train_batches(read, 3, 9, workers=workers)
    try:
        got = list(stream)
    finally:
        stream.close()
    assert len(got) == 6
    for step, batch in zip(range(3, 9), got, strict=True):
        expected = read(step)
        for key in ("image", "label"):
            np.testing.assert_array_equal(batch[key], expected[key])


def test_decode_image_bytes_and_resize():
    from PIL import Image

    image = np.random.default_rng(0).integers(0, 255, (6, 10, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    data = buffer.getvalue()
    np.testing.assert_array_equal(input_pipeline.decode_image(data, (6, 10, 3)), image)
    assert input_pipeline.decode_image(data, (4, 5, 3)).shape == (4, 5, 3)
    grey = input_pipeline.decode_image(np.array(data, dtype=object), (6, 10, 1))
    assert grey.shape == (6, 10, 1)


def test_shard_splits_the_global_batch():
    batch = {"image": np.zeros((16, 8, 8, 1)), "label": np.arange(16)}
    sharded = input_pipeline.shard(batch, 8)
    assert sharded["image"].shape == (8, 2, 8, 8, 1)
    np.testing.assert_array_equal(sharded["label"].reshape(-1), np.arange(16))


def test_affine_jitter_is_seeded_and_exact_on_shifts():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 12, 10, 1)).astype(np.uint8)
    identity = input_pipeline.affine_matrices(3, 7, 5)
    np.testing.assert_array_equal(input_pipeline.warp_affine(images, identity), images)
    a = input_pipeline.affine_matrices(3, 7, 5, rotation=8, scale=0.1, translation=2)
    b = input_pipeline.affine_matrices(3, 7, 5, rotation=8, scale=0.1, translation=2)
    np.testing.assert_array_equal(a, b)  # a pure function of (seed, step)
    assert not np.allclose(
        a, input_pipeline.affine_matrices(3, 8, 5, rotation=8, scale=0.1, translation=2)
    )
    angles = np.degrees(np.arctan2(a[:, 1, 0], a[:, 0, 0]))
    zoom = 1 / np.hypot(a[:, 0, 0], a[:, 1, 0])
    assert np.all(np.abs(angles) <= 8) and np.all(np.abs(zoom - 1) <= 0.1 + 1e-9)
    # A shift by whole pixels moves every pixel, black where it comes in.
    shift = np.zeros((5, 2, 3))
    shift[:, 0, 0] = shift[:, 1, 1] = 1.0
    shift[:, :, 2] = [-2.0, 1.0]  # output (r, c) reads input (r - 2, c + 1)
    out = input_pipeline.warp_affine(images, shift)
    np.testing.assert_array_equal(out[:, 2:, :-1], images[:, :-2, 1:])
    assert not out[:, :2].any() and not out[:, :, -1].any()
    # Rotation by 90 degrees about the centre of a square image.
    square = images[:, :10]
    quarter = np.zeros((5, 2, 3))
    quarter[:, 0, 1], quarter[:, 1, 0] = 1.0, -1.0  # in = (c', -r') about centre
    np.testing.assert_array_equal(
        input_pipeline.warp_affine(square, quarter), np.rot90(square, 1, axes=(1, 2))
    )


def test_read_batch_applies_the_jitter_of_its_step(digits):
    records, labels = digits
    train = input_pipeline.Subset(records, np.arange(len(labels)), labels)
    sampler = input_pipeline.BatchSampler(labels, batch_size=8, seed=1)
    jitter = {"rotation": 10.0, "scale": 0.1, "translation": 1.0}
    plain = input_pipeline.ReadBatch(train, sampler)(4)["image"]
    read = input_pipeline.ReadBatch(train, sampler, random_affine=jitter)
    got = read(4)["image"]
    matrices = input_pipeline.affine_matrices(1, 4, 8, **jitter)
    np.testing.assert_array_equal(got, input_pipeline.warp_affine(plain, matrices))
    # Two processes' halves are the halves of the global batch.
    halves = [
        input_pipeline.ReadBatch(
            train, sampler, process_index=p, process_count=2, random_affine=jitter
        )(4)["image"]
        for p in range(2)
    ]
    np.testing.assert_array_equal(np.concatenate(halves), got)
