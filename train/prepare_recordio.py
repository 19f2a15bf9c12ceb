"""Prepare an insightface RecordIO training set once, for the training pipeline.

    python -m train.prepare_recordio MANUAL_DIR --data_dir DATA_DIR \\
        [--image_size 112 | 112x96]

MANUAL_DIR holds ``train.rec`` and ``train.idx`` (MS1MV2, MS1MV3, Glint360K,
WebFace42M as distributed). The records are copied, encoded as they are, into
a tfds ``array_record`` set ``insightface_recordio/<H>x<W>`` under DATA_DIR
(about the size of the ``.rec``), with a progress bar, then the label cache is
written. Train on it with ``--config.dataset=insightface_recordio/<H>x<W>
--config.data_dir=DATA_DIR`` (train/configs/face112.py's defaults for 112x112).
A damaged ``.rec`` stops the preparation with the record that is damaged.
"""

from __future__ import annotations

import argparse
import sys


def parse_size(text: str) -> tuple[int, int]:
    """'112' -> (112, 112); '112x96' -> (112, 96)."""
    height, _, width = text.lower().partition("x")
    try:
        size = (int(height), int(width or height))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--image_size must be S or HxW (e.g. 112 or 112x96); got {text!r}."
        ) from None
    if min(size) < 1:
        raise argparse.ArgumentTypeError(f"--image_size must be positive: {text!r}.")
    return size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.prepare_recordio", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("manual_dir", help="directory with train.rec and train.idx")
    parser.add_argument("--data_dir", required=True, help="tfds data directory")
    parser.add_argument(
        "--image_size", type=parse_size, default=(112, 112), help="S or HxW"
    )
    args = parser.parse_args(argv)
    from train import recordio_builder

    height, width = args.image_size
    try:
        builder = recordio_builder.prepare_recordio(
            args.manual_dir, args.data_dir, image_size=(height, width)
        )
    except ValueError as e:
        print(
            f"prepare_recordio: {e}\nNothing was prepared. Copy train.rec and "
            "train.idx again from the original distribution (compare their "
            "checksums), then rerun this command.",
            file=sys.stderr,
        )
        return 1
    name = f"{recordio_builder.NAME}/{height}x{width}"
    print(
        f"Prepared {name}: {builder.info.splits['train'].num_examples} images in "
        f"{builder.data_dir}.\nTrain with --config.dataset={name} "
        f"--config.data_dir={args.data_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
