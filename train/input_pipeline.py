"""tfds data in, a Grain stream of per-process batches out.

One input path for every data set, the embedded default included:

* `open_source` opens a prepared tfds data set (``download=False`` semantics:
  the embedded sets, `train.glyphs_builder` (the default) and
  `train.digits_builder`, are prepared locally on first use; any other set
  must already be prepared under ``config.data_dir`` and otherwise stops at
  once with the command to run). It reads the class label
  of every record from a label cache (one int32 per record, written next to
  the prepared files once); no image is read.
* `open_set_split` splits the records by class: the first
  ``num_train_classes`` classes (in sorted order) train, the remaining
  identities are held out for the open-set evaluation, as face recognition is
  evaluated on unseen people. Labels only.
* `BatchSampler` gives the record positions of the global batch of any step
  as a pure function of (seed, step): uniformly shuffled epochs, or P x K
  batches (P classes, K images each) for pair losses. The random horizontal
  flips (``config.random_flip``) and the affine jitter
  (``config.random_affine``: rotation, zoom, shift; `affine_matrices`,
  `warp_affine`) are drawn from (seed, step) too, so resuming at step k reads
  exactly the batches an uninterrupted run reads.
* `train_batches` is the stream: a `grain.MapDataset` over the steps whose
  element is this process's slice of the step's global batch (read, decoded,
  flipped, jittered, stacked), run in ``config.data_workers`` worker processes (0: in
  the main process, with a prefetch thread) with a small prefetch buffer.
  Host memory holds a few batches whatever the data set's size.
* Images travel as uint8 [b, H, W, C]; the train step maps them to [-1, 1]
  on the devices (`preprocess`). `shard` reshapes a batch [B, ...] to
  [devices, B / devices, ...].

Records hold either uint8 image tensors (the digits) or encoded image bytes
(JPEG/PNG, the prepared insightface RecordIO sets), decoded with Pillow in
the workers and resized to the set's image size when they differ.
"""

from __future__ import annotations

import dataclasses
import io
import os
import socket

import numpy as np

SAMPLERS = ("random", "pk")
# Buffered batches: per worker process, or in the main process's thread.
PREFETCH_BATCHES = 2


class DatasetNotPreparedError(RuntimeError):
    """The requested tfds data set is not on disk (nothing is downloaded)."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Images uint8 [N, H, W, C] and integer labels [N], in memory (small sets)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def _prepare_message(name: str, data_dir: str) -> str:
    from train import digits_builder, glyphs_builder

    return (
        f"The tfds data set {name!r} is not prepared in {data_dir!r}, and "
        "margin-jax never downloads data at run time. Prepare it once (with "
        "network access, array_record format, images as uint8 tensors or with "
        "TensorFlow installed for Image features):\n"
        f"  tfds build {name} --data_dir {data_dir} --file_format array_record\n"
        "or point config.data_dir at the directory that holds it. The embedded "
        f"sets {glyphs_builder.NAME!r} and {digits_builder.NAME!r} need no "
        "preparation."
    )


def get_builder(name: str, data_dir: str):
    """The tfds builder of a prepared data set (the digits default is built)."""
    import tensorflow_datasets as tfds

    from train import digits_builder, glyphs_builder, recordio_builder

    data_dir = os.path.expanduser(data_dir)
    if name == digits_builder.NAME:
        return digits_builder.prepare_digits(data_dir)
    if name == glyphs_builder.NAME:
        return glyphs_builder.prepare_glyphs(data_dir)
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


def _data_source(builder, name: str, split: str, data_dir: str):
    try:
        return builder.as_data_source(split=split)
    except Exception as e:  # tfrecord files have no random access.
        raise DatasetNotPreparedError(
            f"Cannot open {name!r} split {split!r} as a random-access data source "
            f"({e}). Rebuild it with --file_format array_record.\n"
            + _prepare_message(name, data_dir)
        ) from e


def _image_shape(builder, name: str, image_key: str) -> tuple[int, int, int]:
    """(H, W, C) of the decoded images: the feature's shape or the metadata's."""
    metadata = builder.info.metadata or {}
    if "image_shape" in metadata:
        return tuple(int(v) for v in metadata["image_shape"])
    shape = tuple(builder.info.features[image_key].shape)
    if len(shape) == 2:
        shape = (*shape, 1)
    if len(shape) != 3 or None in shape:
        raise ValueError(
            f"Data set {name!r}: feature {image_key!r} has shape {shape}; the "
            "input pipeline needs images of one size [H, W, C] (or an "
            "'image_shape' entry in the data set's metadata)."
        )
    return shape


def decode_image(value, image_shape: tuple[int, int, int]) -> np.ndarray:
    """A record's image as uint8 [H, W, C]: a tensor as it is, bytes decoded.

    Encoded bytes (JPEG, PNG) are decoded with Pillow (RGB for C = 3, grey for
    C = 1) and resized (bilinear) to ``image_shape`` when their size differs.
    """
    if isinstance(value, bytes | np.bytes_) or (
        isinstance(value, np.ndarray) and value.dtype == object
    ):
        from PIL import Image

        data = value.item() if isinstance(value, np.ndarray) else bytes(value)
        height, width, channels = image_shape
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB" if channels == 3 else "L")
            if img.size != (width, height):
                img = img.resize((width, height), Image.Resampling.BILINEAR)
            image = np.asarray(img, dtype=np.uint8)
    else:
        image = np.asarray(value, dtype=np.uint8)
    if image.ndim == 2:
        image = image[..., None]
    return image


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """What any process needs to open a prepared data set (small, picklable)."""

    name: str
    data_dir: str
    split: str
    image_key: str
    label_key: str
    image_shape: tuple[int, int, int]


class Records:
    """Random access to the decoded images of a prepared data set.

    The tfds data source is opened on first use in each process (the object
    pickles without it, so Grain's worker processes open their own).
    """

    def __init__(self, spec: SourceSpec):
        self.spec = spec
        self._source = None

    def __getstate__(self):
        return {"spec": self.spec, "_source": None}

    def __len__(self) -> int:
        return len(self._open())

    def _open(self):
        if self._source is None:
            spec = self.spec
            builder = get_builder(spec.name, spec.data_dir)
            self._source = _data_source(builder, spec.name, spec.split, spec.data_dir)
        return self._source

    def read(self, indices) -> np.ndarray:
        """uint8 images [n, H, W, C] of the records ``indices``."""
        indices = [int(i) for i in np.asarray(indices).reshape(-1)]
        records = self._open().__getitems__(indices) if indices else []
        out = np.empty((len(indices), *self.spec.image_shape), np.uint8)
        for i, (index, record) in enumerate(zip(indices, records, strict=True)):
            try:
                image = decode_image(record[self.spec.image_key], self.spec.image_shape)
            except Exception as e:  # Pillow raises many types for bad data
                raise ValueError(
                    f"Data set {self.spec.name!r} split {self.spec.split!r}: record "
                    f"{index} has an image that cannot be decoded ({e}). Prepare "
                    "the data set again from intact source files."
                ) from e
            if image.shape != out.shape[1:]:
                raise ValueError(
                    f"Data set {self.spec.name!r}: record {index} has an image of "
                    f"shape {image.shape}, expected {out.shape[1:]}."
                )
            out[i] = image
        return out


def _labels_path(builder, split: str, label_key: str) -> str:
    return os.path.join(os.fspath(builder.data_dir), f"{split}.{label_key}.npy")


def class_labels(builder, name: str, split: str, label_key: str, *, progress=True):
    """int32 [N]: the class of every record, from the label cache.

    The cache (``<split>.<label_key>.npy`` in the prepared data set's
    directory) is written by one pass over the records the first time; a
    directory that is not writable only costs that pass again next time.
    """
    path = _labels_path(builder, split, label_key)
    if os.path.isfile(path):
        return np.load(path)
    import tqdm

    source = _data_source(builder, name, split, os.fspath(builder.data_dir))
    labels = np.empty(len(source), np.int32)
    chunk = 4096
    with tqdm.tqdm(
        total=len(source),
        desc=f"labels of {name}",
        unit="record",
        disable=not progress or len(source) <= chunk,
    ) as bar:
        for start in range(0, len(source), chunk):
            stop = min(start + chunk, len(source))
            rows = source.__getitems__(list(range(start, stop)))
            labels[start:stop] = [int(r[label_key]) for r in rows]
            bar.update(stop - start)
    try:
        tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp.npy"
        np.save(tmp, labels)
        os.replace(tmp, path)
    except OSError:
        pass
    return labels


def open_source(
    name: str,
    data_dir: str,
    *,
    split: str = "train",
    image_key: str = "image",
    label_key: str = "label",
) -> tuple[Records, np.ndarray]:
    """(records, labels int32 [N]) of a prepared data set; no image is read."""
    builder = get_builder(name, data_dir)
    _data_source(builder, name, split, data_dir)  # fails fast: not random access
    spec = SourceSpec(
        name=name,
        data_dir=data_dir,
        split=split,
        image_key=image_key,
        label_key=label_key,
        image_shape=_image_shape(builder, name, image_key),
    )
    return Records(spec), class_labels(builder, name, split, label_key)


@dataclasses.dataclass(frozen=True)
class Subset:
    """Some records of a data set with their labels; images read on demand."""

    records: Records
    index: np.ndarray  # record indices [N]
    labels: np.ndarray  # int32 [N]

    def __len__(self) -> int:
        return len(self.index)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.records.spec.image_shape

    def read(self, start: int, stop: int) -> np.ndarray:
        """uint8 images [stop - start, H, W, C] of rows start .. stop - 1."""
        return self.records.read(self.index[start:stop])

    def load(self) -> Dataset:
        """All images in memory (for small sets: figures, notebooks)."""
        return Dataset(self.read(0, len(self)), self.labels)


def open_set_split(
    labels: np.ndarray, num_train_classes: int, *, allow_all: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train rows, train labels remapped to 0..C-1, held-out rows) by class.

    Held-out rows keep their original labels (they only define which
    embeddings match). Classes are taken in sorted order, so the split is
    deterministic. ``allow_all``: ``num_train_classes`` may name every class
    (no identity held out), for runs judged on verification sets instead.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    high = len(classes) - 2
    if not (
        2 <= num_train_classes <= high
        or (allow_all and num_train_classes == len(classes))
    ):
        raise ValueError(
            f"num_train_classes must be in [2, {high}] so that both sides have "
            f"at least two identities, or all {len(classes)} with "
            f"config.val_targets; got {num_train_classes} for {len(classes)} "
            "classes."
        )
    train_classes = classes[:num_train_classes]
    is_train = np.isin(labels, train_classes)
    rows = np.flatnonzero(is_train)
    remap = np.searchsorted(train_classes, labels[rows]).astype(np.int32)
    return rows, remap, np.flatnonzero(~is_train)


class BatchSampler:
    """Positions of the global batch of each step, a pure function of (seed, step).

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
        self._epoch = (None, None)  # (epoch, permutation): one epoch cached
        if sampler == "pk":
            order = np.argsort(self.labels, kind="stable")
            bounds = np.flatnonzero(np.diff(self.labels[order])) + 1
            self.by_class = np.split(order, bounds)
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
        if self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch = (epoch, rng.permutation(len(self.labels)))
        return self._epoch[1][i * self.batch_size : (i + 1) * self.batch_size]


def flips(seed: int, step: int, batch_size: int) -> np.ndarray:
    """bool [batch_size]: which images of the step's global batch are mirrored."""
    # A stream apart from the samplers' ([seed, step] / [seed, epoch]).
    return np.random.default_rng([seed, step, 1]).random(batch_size) < 0.5


def affine_matrices(
    seed: int,
    step: int,
    batch_size: int,
    *,
    rotation: float = 0.0,
    scale: float = 0.0,
    translation: float = 0.0,
) -> np.ndarray:
    """float64 [batch_size, 2, 3]: a random affine map per image of the step's
    global batch, output pixel (row, col, 1) -> input pixel, about the centre.

    Uniform draws: a rotation in ±``rotation`` degrees, a zoom factor in
    1 ± ``scale``, a shift in ±``translation`` pixels along each axis. A pure
    function of (seed, step), like `flips`.
    """
    rng = np.random.default_rng([seed, step, 2])
    angle = np.deg2rad(rng.uniform(-rotation, rotation, batch_size))
    zoom = rng.uniform(1.0 - scale, 1.0 + scale, batch_size)
    shift = rng.uniform(-translation, translation, (batch_size, 2))
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    # input = R(-angle) / zoom · (output - shift - centre) + centre
    linear = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    return np.concatenate([linear, -(linear @ shift[..., None])], axis=-1)


def warp_affine(images: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """``images`` uint8 [b, H, W, C] resampled by `affine_matrices` (bilinear,
    black outside the image)."""
    b, h, w, _ = images.shape
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    grid = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1)
    out = (grid - centre).reshape(1, -1, 2)  # [1, HW, 2]
    src = out @ matrices[:, :, :2].transpose(0, 2, 1) + matrices[:, None, :, 2]
    src = src + centre  # [b, HW, 2] (row, col) in the input
    base = np.floor(src).astype(np.int64)
    frac = src - base
    x = images.astype(np.float32)
    result = np.zeros((b, h * w, images.shape[-1]), np.float32)
    batch = np.arange(b)[:, None]
    for dr, dc in ((0, 0), (0, 1), (1, 0), (1, 1)):
        r, c = base[..., 0] + dr, base[..., 1] + dc
        weight = (frac[..., 0] if dr else 1 - frac[..., 0]) * (
            frac[..., 1] if dc else 1 - frac[..., 1]
        )
        inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        pixels = x[batch, np.clip(r, 0, h - 1), np.clip(c, 0, w - 1)]
        result += (weight * inside)[..., None] * pixels
    return np.clip(np.rint(result), 0, 255).astype(np.uint8).reshape(images.shape)


def preprocess(images):
    """uint8 [..., H, W, C] -> float32 in [-1, 1] (NumPy or JAX arrays)."""
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


class ReadBatch:
    """step -> this process's slice of the step's global batch (a Grain map).

    Returns {"image": uint8 [b, H, W, C], "label": int32 [b]} with b = the
    global batch / ``process_count``; mirrored images where `flips` says so.
    """

    def __init__(
        self,
        train: Subset,
        sampler: BatchSampler,
        *,
        process_index: int = 0,
        process_count: int = 1,
        random_flip: bool = False,
        random_affine=None,
    ):
        self.train = train
        self.sampler = sampler
        self.process_index = process_index
        self.process_count = process_count
        self.random_flip = random_flip
        # {"rotation", "scale", "translation"} of `affine_matrices`; all 0: off.
        self.random_affine = {
            k: float(v) for k, v in dict(random_affine or {}).items() if v
        }

    def __call__(self, step) -> dict:
        step = int(step)
        positions = self.sampler(step)
        mine = process_slice(
            np.arange(len(positions)), self.process_index, self.process_count
        )
        positions = positions[mine]
        images = self.train.records.read(self.train.index[positions])
        if self.random_flip:
            mirror = flips(self.sampler.seed, step, self.sampler.batch_size)[mine]
            images[mirror] = images[mirror][:, :, ::-1]
        if self.random_affine:
            matrices = affine_matrices(
                self.sampler.seed,
                step,
                self.sampler.batch_size,
                **self.random_affine,
            )
            images = warp_affine(images, matrices[mine])
        return {"image": images, "label": self.train.labels[positions]}


def _absl_flags_parsed() -> None:
    """Grain reads absl flags; a library caller (tests, notebooks) has none."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def train_batches(read: ReadBatch, start: int, stop: int, *, workers: int = 0):
    """A Grain iterator of ``read(step)`` for steps ``start .. stop - 1``, in order.

    ``workers`` > 0 processes run the reads (each opens the data set itself),
    each buffering `PREFETCH_BATCHES` batches; with 0 one thread of the main
    process reads ahead. Call ``close()`` on the iterator when done.

    Grain starts its workers by spawning: a script of your own that trains
    with workers must keep its top-level code under
    ``if __name__ == "__main__":`` (``python -m train.main`` does).
    """
    import grain

    if workers < 0:
        raise ValueError(f"config.data_workers must be >= 0; got {workers}.")
    _absl_flags_parsed()
    steps = grain.MapDataset.range(start, stop).map(read)
    stream = steps.to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=PREFETCH_BATCHES)
    )
    if workers:
        stream = stream.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=workers, per_worker_buffer_size=PREFETCH_BATCHES
            )
        )
    return iter(stream)
