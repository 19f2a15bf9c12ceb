"""tfds data in, sharded NumPy batches out.

* `load_dataset` opens the data set named by the config with ``download=False``
  semantics: the embedded default (`train.digits_builder`) is prepared locally
  on first use; any other tfds data set must already be prepared under
  ``config.data_dir`` and otherwise stops at once with the command to run.
* `open_set_split` splits by class: the first ``num_train_classes`` classes
  (in sorted order) train, the remaining identities are held out for the
  open-set evaluation, as face recognition is evaluated on unseen people.
* `BatchSampler` gives the indices of the global batch of any step as a pure
  function of (seed, step): uniformly shuffled epochs, or P x K batches (P
  classes, K images each) for pair losses. Resuming at step k therefore reads
  exactly the batches an uninterrupted run would have read.
* `shard` reshapes a global batch [B, ...] to [devices, B / devices, ...].

The whole split is read into memory (fine for the embedded data set and
small benchmarks; a streaming reader for MS1MV2-sized sets is future work).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from train import digits_builder, recordio_builder

SAMPLERS = ("random", "pk")


class DatasetNotPreparedError(RuntimeError):
    """The requested tfds data set is not on disk (nothing is downloaded)."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Images uint8 [N, H, W, C] and integer labels [N] of one split."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def _prepare_message(name: str, data_dir: str) -> str:
    return (
        f"The tfds data set {name!r} is not prepared in {data_dir!r}, and "
        "margin-jax never downloads data at run time. Prepare it once (with "
        "network access, array_record format, images as uint8 tensors or with "
        "TensorFlow installed for Image features):\n"
        f"  tfds build {name} --data_dir {data_dir} --file_format array_record\n"
        "or point config.data_dir at the directory that holds it. The embedded "
        f"default {digits_builder.NAME!r} needs no preparation."
    )


def get_builder(name: str, data_dir: str):
    """The tfds builder of a prepared data set (the digits default is built)."""
    import tensorflow_datasets as tfds

    data_dir = os.path.expanduser(data_dir)
    if name == digits_builder.NAME:
        return digits_builder.prepare_digits(data_dir)
    if name.partition("/")[0] == recordio_builder.NAME:
        builder = recordio_builder.prepared_builder(name, data_dir)
        if builder is None:
            message = recordio_builder.prepare_message(name, data_dir)
            raise DatasetNotPreparedError(message)
        return builder
    try:
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DatasetNotPreparedError(
            f"Unknown tfds data set {name!r}.\n" + _prepare_message(name, data_dir)
        ) from e
    if not builder.is_prepared():
        raise DatasetNotPreparedError(_prepare_message(name, data_dir))
    return builder


def load_dataset(
    name: str,
    data_dir: str,
    *,
    split: str = "train",
    image_key: str = "image",
    label_key: str = "label",
) -> Dataset:
    """Reads ``split`` of a prepared tfds data set into memory (no TensorFlow)."""
    builder = get_builder(name, data_dir)
    try:
        source = builder.as_data_source(split=split)
    except Exception as e:  # tfrecord files have no random access.
        raise DatasetNotPreparedError(
            f"Cannot open {name!r} split {split!r} as a random-access data source "
            f"({e}). Rebuild it with --file_format array_record.\n"
            + _prepare_message(name, data_dir)
        ) from e
    records = source.__getitems__(list(range(len(source))))
    images = np.stack([np.asarray(r[image_key]) for r in records])
    if images.ndim == 3:
        images = images[..., None]
    labels = np.asarray([r[label_key] for r in records], dtype=np.int32)
    return Dataset(images=images.astype(np.uint8), labels=labels)


def open_set_split(data: Dataset, num_train_classes: int) -> tuple[Dataset, Dataset]:
    """(train identities, held-out identities), train labels remapped to 0..C-1.

    Held-out labels keep their original values (they only define which
    embeddings match). Classes are taken in sorted order, so the split is
    deterministic.
    """
    classes = np.unique(data.labels)
    if not 2 <= num_train_classes <= len(classes) - 2:
        raise ValueError(
            f"num_train_classes must be in [2, {len(classes) - 2}] so that both "
            f"sides have at least two identities; got {num_train_classes} for "
            f"{len(classes)} classes."
        )
    train_classes = classes[:num_train_classes]
    is_train = np.isin(data.labels, train_classes)
    remap = np.searchsorted(train_classes, data.labels[is_train]).astype(np.int32)
    train = Dataset(data.images[is_train], remap)
    held_out = Dataset(data.images[~is_train], data.labels[~is_train])
    return train, held_out


class BatchSampler:
    """Indices of the global batch of each step, a pure function of (seed, step).

    ``random``: epochs of a seeded permutation, the last partial batch dropped.
    ``pk``: P = batch_size / K classes without replacement, K images of each
    (with replacement only if a class has fewer than K images).
    """

    def __init__(
        self,
        labels: np.ndarray,
        *,
        batch_size: int,
        seed: int,
        sampler: str = "random",
        images_per_class: int = 4,
    ):
        if sampler not in SAMPLERS:
            raise ValueError(
                f"Unknown sampler {sampler!r}; valid choices for config.sampler: "
                f"{', '.join(SAMPLERS)}."
            )
        if batch_size > len(labels):
            raise ValueError(f"batch_size {batch_size} > data set size {len(labels)}.")
        self.labels = np.asarray(labels)
        self.batch_size = batch_size
        self.seed = seed
        self.sampler = sampler
        self.k = images_per_class
        self.steps_per_epoch = len(labels) // batch_size
        self.by_class = [np.flatnonzero(self.labels == c) for c in np.unique(labels)]
        if sampler == "pk":
            p, rem = divmod(batch_size, self.k)
            if rem or p > len(self.by_class):
                raise ValueError(
                    f"P x K sampling needs batch_size ({batch_size}) = P x "
                    f"images_per_class ({self.k}) with P <= {len(self.by_class)} "
                    "classes."
                )
            self.p = p

    def __call__(self, step: int) -> np.ndarray:
        if self.sampler == "pk":
            rng = np.random.default_rng([self.seed, step])
            classes = rng.choice(len(self.by_class), self.p, replace=False)
            return np.concatenate(
                [
                    rng.choice(
                        self.by_class[c],
                        self.k,
                        replace=len(self.by_class[c]) < self.k,
                    )
                    for c in classes
                ]
            )
        epoch, i = divmod(step, self.steps_per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.labels))
        return perm[i * self.batch_size : (i + 1) * self.batch_size]


def preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, C] -> float32 in [-1, 1]."""
    return images.astype(np.float32) / 127.5 - 1.0


def shard(batch: dict, num_devices: int) -> dict:
    """[B, ...] -> [num_devices, B / num_devices, ...] for every entry."""

    def split(x):
        if x.shape[0] % num_devices:
            raise ValueError(
                f"Global batch {x.shape[0]} is not divisible by {num_devices} devices."
            )
        return x.reshape(num_devices, -1, *x.shape[1:])

    return {k: split(v) for k, v in batch.items()}


def process_slice(indices: np.ndarray, process_index: int, process_count: int):
    """This process's contiguous share of the global batch (multi-host runs).

    Every process computes the same global batch from (seed, step); process p of
    n reads rows [p·B/n, (p+1)·B/n), which it then shards over its local devices.
    """
    if len(indices) % process_count:
        raise ValueError(
            f"Global batch {len(indices)} is not divisible by {process_count} "
            "processes; choose config.batch_size as a multiple of the device count."
        )
    size = len(indices) // process_count
    return indices[process_index * size : (process_index + 1) * size]


def get_batch(data: Dataset, indices: np.ndarray) -> dict:
    """The (unsharded) global batch for ``indices``."""
    return {"image": preprocess(data.images[indices]), "label": data.labels[indices]}
