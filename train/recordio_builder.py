"""insightface RecordIO training sets (MS1MV2, Glint360K, ...) as a tfds builder.

The user places ``train.rec`` and ``train.idx`` (see `train.recordio`) in the
manual directory; the builder streams the records through
`train.recordio.RecordIOReader` (no mxnet, no TensorFlow, no network) and
writes each image's encoded bytes as they are in the ``.rec`` (JPEG, as
insightface stores them) with its int64 label in ``array_record`` files, so
the prepared set is about the size of the ``.rec``. The input pipeline's
workers decode them (`train.input_pipeline.decode_image`) and resize images
of another size than the config's (Pillow, bilinear). One split, ``train``;
the open-set split by class is made by the input pipeline from the label
cache written after preparation (no image is read for it).

Configs name the image size: ``112x112`` (the default; MS1MV2, MS1MV3,
Glint360K, WebFace), ``112x96`` (SphereFace-style crops), ``32x32`` (CPU
smoke runs); `prepare_recordio` makes any other size, which is then loadable
by name (``insightface_recordio/64x64``) from the prepared files.

Prepare it once with ``python -m train.prepare_recordio MANUAL_DIR --data_dir
DATA_DIR [--image_size 112]`` (or ``prepare_recordio(manual_dir, data_dir)``).
Every record's header is checked while it is written (a truncated or corrupt
``.rec`` stops the preparation and names the record); images are decoded only
when read for training.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from train import recordio

NAME = "insightface_recordio"
FILE_FORMAT = "array_record"
FILES = ("train.rec", "train.idx")

_INSTRUCTIONS = """\
Place the insightface training set files `train.rec` and `train.idx` (as
distributed with MS1MV2, MS1MV3, Glint360K, WebFace; `property` is optional)
in the manual directory: by default `<data_dir>/downloads/manual/` (for the
default data_dir `~/tensorflow_datasets/downloads/manual/`), or any directory
passed as `download_config=tfds.download.DownloadConfig(manual_dir=...)`, as
`train.recordio_builder.prepare_recordio(manual_dir, data_dir)` does. Nothing
is downloaded.
"""


@dataclasses.dataclass(eq=False)
class InsightfaceRecordIOConfig(tfds.core.BuilderConfig):
    """The stored image size (images of another size are resized)."""

    height: int = 112
    width: int = 112


def _config(height: int, width: int) -> InsightfaceRecordIOConfig:
    return InsightfaceRecordIOConfig(
        name=f"{height}x{width}",
        height=height,
        width=width,
        description=f"RGB images resized to {height}x{width}.",
    )


class InsightfaceRecordIO(tfds.core.GeneratorBasedBuilder):
    """An insightface / MXNet RecordIO face-recognition training set."""

    name = NAME
    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release (decoded uint8 images).",
        "2.0.0": "Encoded image bytes as in the .rec; decoded by the input pipeline.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
    BUILDER_CONFIGS = [_config(112, 112), _config(112, 96), _config(32, 32)]
    DEFAULT_BUILDER_CONFIG_NAME = "112x112"

    def _info(self) -> tfds.core.DatasetInfo:
        shape = [self.builder_config.height, self.builder_config.width, 3]
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    # Encoded (JPEG) bytes; decoded to `image_shape` when read.
                    "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "label": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(image_shape=shape),
            homepage="https://github.com/deepinsight/insightface",
            citation=(
                "Deng, J., Guo, J., Xue, N. & Zafeiriou, S. (2019). ArcFace: "
                "Additive Angular Margin Loss for Deep Face Recognition. CVPR."
            ),
        )

    def _split_generators(self, dl_manager):
        manual_dir = os.fspath(dl_manager.manual_dir)
        paths = [os.path.join(manual_dir, name) for name in FILES]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise ValueError(
                f"{NAME}: {', '.join(map(repr, missing))} not found.\n" + _INSTRUCTIONS
            )
        return {"train": self._generate_examples(*paths)}

    def _generate_examples(self, path_rec, path_idx):
        with recordio.RecordIOReader(path_rec, path_idx) as reader:
            for key in reader.image_keys:
                data, label = reader.read_encoded(key)
                yield key, {"image": data, "label": label}


def prepare_recordio(
    manual_dir, data_dir: str, *, image_size: int | tuple[int, int] = 112
) -> InsightfaceRecordIO:
    """Builds the set in ``manual_dir`` under ``data_dir`` unless it is there.

    Nothing is downloaded. The prepared set is not rebuilt when the files in
    ``manual_dir`` change: delete ``<data_dir>/insightface_recordio/<H>x<W>``
    first.

    Args:
      manual_dir: directory holding ``train.rec`` and ``train.idx``.
      data_dir: the tfds data directory to write into.
      image_size: stored size, ``S`` for S x S or ``(height, width)``.

    Returns:
      The prepared builder; ``builder.as_data_source("train")`` reads it, and
      the input pipeline loads it as ``insightface_recordio/<H>x<W>``.
    """
    height, width = (image_size, image_size) if np.ndim(image_size) == 0 else image_size
    name = f"{int(height)}x{int(width)}"
    config = InsightfaceRecordIO.builder_configs.get(name) or _config(
        int(height), int(width)
    )
    builder = InsightfaceRecordIO(
        config=config, data_dir=os.path.expanduser(data_dir), file_format=FILE_FORMAT
    )
    if not builder.is_prepared():
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                manual_dir=os.path.expanduser(os.fspath(manual_dir)),
                try_download_gcs=False,
            )
        )
    from train import input_pipeline

    # The label cache: the open-set split and the samplers read labels only.
    input_pipeline.class_labels(builder, f"{NAME}/{name}", "train", "label")
    return builder


def _config_name(name: str) -> str:
    return name.partition("/")[2] or InsightfaceRecordIO.DEFAULT_BUILDER_CONFIG_NAME


def prepared_builder(name: str, data_dir: str):
    """The builder of ``insightface_recordio[/<H>x<W>]`` if prepared, else None.

    Read from the prepared files, so sizes made by `prepare_recordio` outside
    ``BUILDER_CONFIGS`` load too; nothing is built.
    """
    try:
        builder = tfds.core.read_only_builder.builder_from_files(
            f"{NAME}/{_config_name(name)}", data_dir=os.path.expanduser(data_dir)
        )
    except tfds.core.registered.DatasetNotFoundError:
        return None
    return builder if builder.is_prepared() else None


def prepare_message(name: str, data_dir: str) -> str:
    """How to prepare ``name`` in ``data_dir`` (for DatasetNotPreparedError)."""
    height, _, width = _config_name(name).partition("x")
    size = f"{height}x{width}" if height.isdigit() and width.isdigit() else "112"
    return (
        f"The insightface RecordIO set {name!r} is not prepared in {data_dir!r}, "
        "and margin-jax never downloads data at run time. Put train.rec and "
        "train.idx in a directory MANUAL_DIR and prepare it once:\n"
        f"  python -m train.prepare_recordio MANUAL_DIR --data_dir {data_dir} "
        f"--image_size {size}\n"
        f"then use the name '{NAME}/<H>x<W>' (e.g. '{NAME}/112x112')."
    )
