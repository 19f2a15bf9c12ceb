"""The embedded glyph data set and the default job on it (quick variant)."""

import json
import socket
import unicodedata

import jax
import numpy as np
import pytest

from train import evaluation, glyphs_builder, input_pipeline, models
from train import train as train_lib
from train.configs import default


@pytest.fixture(scope="module")
def rendered():
    return glyphs_builder.render_glyphs()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The data set built by tfds in a fresh data_dir, with the network off."""
    path = str(tmp_path_factory.mktemp("tfds"))

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access while building: {args}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket, "create_connection", refuse)
        records, labels = input_pipeline.open_source(glyphs_builder.NAME, path)
    return path, records, labels


def test_rendering_is_deterministic(rendered):
    again = glyphs_builder.render_glyphs()
    np.testing.assert_array_equal(again[0], rendered[0])
    np.testing.assert_array_equal(again[1], rendered[1])
    assert again[2:] == rendered[2:]


def test_documented_counts_and_shapes(rendered):
    images, labels, names, fonts = rendered
    assert images.shape == (glyphs_builder.NUM_IMAGES, 32, 32, 1)
    assert images.dtype == np.uint8
    assert len(names) == glyphs_builder.NUM_CLASSES
    counts = np.bincount(labels, minlength=len(names))
    assert counts.min() >= glyphs_builder.MIN_IMAGES
    assert set(fonts) <= set(glyphs_builder.FONTS)
    # Sorted by label, one image per (class, font) at most.
    assert np.all(np.diff(labels) >= 0)
    assert len(set(zip(labels.tolist(), fonts, strict=True))) == len(labels)


def test_no_two_images_equal_and_every_image_has_ink(rendered):
    images, labels, names, _ = rendered
    flat = images.reshape(len(images), -1)
    assert len({row.tobytes() for row in flat}) == len(images)
    assert np.all((flat >= 128).sum(axis=1) >= glyphs_builder.MIN_INK_PIXELS)
    # Homoglyphs are one class: Latin, Greek and Cyrillic capital A.
    characters = [name.split(" ", 1)[1] for name in names]
    assert "A" in characters
    assert "\u0391" not in characters and "\u0410" not in characters
    assert all(unicodedata.category(c)[0] not in "CZ" for c in characters)


def test_classes_are_shuffled_before_the_open_set_split(rendered):
    _, labels, names, _ = rendered
    rows, _, held = input_pipeline.open_set_split(
        labels, default.get_config().num_train_classes
    )
    codes = np.array([int(n.split(" ")[0][2:], 16) for n in names])
    held_codes = codes[np.unique(labels[held])]
    assert len(held_codes) == glyphs_builder.NUM_CLASSES - 1300
    # Held-out characters come from all over Unicode, not its last blocks.
    assert held_codes.min() < 0x100 and held_codes.max() > 0x2000
    assert np.median(held_codes) < np.percentile(codes, 75)


def test_tfds_build_equals_the_rendering(built, rendered):
    _, records, labels = built
    images = records.read(np.arange(len(labels)))  # tfds shuffles the records
    stored = sorted(zip(labels.tolist(), (x.tobytes() for x in images), strict=True))
    made = sorted(
        zip(rendered[1].tolist(), (x.tobytes() for x in rendered[0]), strict=True)
    )
    assert stored == made


def test_default_quick_variant_trains_and_reports_baselines(built, tmp_path):
    data_dir, records, labels = built
    config = default.get_config("quick")
    config.data_dir = data_dir
    results = train_lib.train_and_evaluate(config, str(tmp_path))
    with open(tmp_path / "eval.json") as f:
        written = json.load(f)
    assert set(written["baselines"]) == {"raw_pixels", "untrained"}
    model_keys = set(written) - {"baselines"}
    for baseline in written["baselines"].values():
        assert set(baseline) == model_keys
    assert written["num_held_out_images"] == int(np.sum(labels >= 1300))

    # Recomputed from the data set: the held-out images, read back directly.
    held = np.flatnonzero(labels >= config.num_train_classes)
    images = records.read(held)
    first, second, issame = evaluation.make_pairs(
        labels[held], config.eval_num_pairs, config.seed
    )
    from margin_jax import eval as mj_eval

    pixels = images.reshape(len(held), -1) / 255.0
    pixels /= np.linalg.norm(pixels, axis=1, keepdims=True)
    expected = mj_eval.verification_accuracy(pixels[first], pixels[second], issame)
    recall = mj_eval.recall_at_k(pixels, labels[held], ks=(1,))
    raw = written["baselines"]["raw_pixels"]
    np.testing.assert_allclose(raw["verification_accuracy"], expected["mean"], 1e-6)
    np.testing.assert_allclose(raw["recall_at_k"]["recall@1"], recall["recall@1"])

    # The untrained network: the model built from the seed, never updated.
    model = models.create_model(config, (32, 32, 1), 1300, axis_name=None, seed=0)
    model.eval()
    emb = np.asarray(jax.jit(model)(input_pipeline.preprocess(images)))
    expected = mj_eval.verification_accuracy(emb[first], emb[second], issame)
    untrained = written["baselines"]["untrained"]
    np.testing.assert_allclose(
        untrained["verification_accuracy"], expected["mean"], atol=2e-3
    )
    # The same pairs for all three: a trained network differs from its start.
    assert results["num_pairs"] == raw["num_pairs"] == untrained["num_pairs"]
    assert results["verification_accuracy"] != untrained["verification_accuracy"]
    report = (tmp_path / "report.md").read_text()
    assert "| metric | model | untrained network | raw pixels |" in report
    assert (tmp_path / "embeddings.png").exists()
