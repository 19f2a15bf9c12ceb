"""The embedded default data set: scikit-learn's digits as a tfds builder.

1,797 greyscale 8x8 images of the digits 0-9 (16 grey levels, shipped inside
scikit-learn, so nothing is downloaded). Images are stored as uint8 ``Tensor``
features (grey level · 17, so 0..16 maps to 0..255) in ``array_record`` files,
which tfds writes and reads without TensorFlow (an ``Image`` feature would need
it). One split, ``train``; the open-set split by class is made by the input
pipeline.

Prepare it with ``prepare_digits(data_dir)``; the training pipeline does this
on first use.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import tensorflow_datasets as tfds

NAME = "margin_jax_digits"
FILE_FORMAT = "array_record"


class MarginJaxDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn digits (UCI optical recognition of handwritten digits)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
            citation=(
                "Alpaydin, E. & Kaynak, C. (1998). Optical Recognition of "
                "Handwritten Digits. UCI Machine Learning Repository."
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the data ships with scikit-learn.
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = (digits.images * 17).astype(np.uint8)[..., None]
        for i, (image, label) in enumerate(zip(images, digits.target, strict=True)):
            yield i, {"image": image, "label": int(label)}


@contextlib.contextmanager
def _exclusive(path: str):
    """An advisory lock on ``path`` (POSIX; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_locked(make, name: str, data_dir: str):
    """``make(build)`` 's builder, prepared under ``data_dir`` unless it is.

    ``make(False)`` opens, ``make(True)`` makes a builder that can build. Several
    processes may call this at once (tests, notebooks): one builds, the others
    wait for it under a lock file in ``data_dir``.
    """
    builder = make(False)
    if builder.is_prepared():
        return builder
    os.makedirs(data_dir, exist_ok=True)
    with _exclusive(os.path.join(data_dir, f".{name}.lock")):
        builder = make(False)
        if not builder.is_prepared():
            builder = make(True)
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False)
            )
    return builder


def prepare_digits(data_dir: str) -> MarginJaxDigits:
    """Builds the digits data set under ``data_dir`` unless it is there already
    (under a lock, see `prepare_locked`)."""
    return prepare_locked(
        lambda build: MarginJaxDigits(data_dir=data_dir, file_format=FILE_FORMAT),
        NAME,
        data_dir,
    )
