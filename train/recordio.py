"""Read and write insightface / MXNet RecordIO training sets without mxnet.

The face-recognition training sets people have (MS1MV2, MS1MV3, Glint360K,
WebFace) come as ``train.rec`` + ``train.idx`` (+ ``property``), written by
MXNet's ``MXIndexedRecordIO`` (dmlc-core RecordIO):

* ``.rec``: records back to back. Each is a little-endian uint32 magic
  ``0xced7230a``, a uint32 ``lrecord`` whose upper 3 bits are the continuation
  flag ``cflag`` and lower 29 bits the payload length, the payload, and zero
  padding to a multiple of 4 bytes. dmlc's writer splits a payload wherever
  the magic occurs at a 4-byte aligned position: the parts get ``cflag`` 1
  (first), 2 (middle) and 3 (last), the magic itself is dropped, and the
  reader puts it back between the parts. ``cflag`` 0 is a whole record.
* ``.idx``: text lines ``key\\toffset``, the byte offset of each record's first
  part in the ``.rec`` file.
* A payload is insightface's ``IRHeader`` packed as ``struct`` ``'IfQQ'``
  (flag, label, id, id2; 24 bytes), then, when ``flag > 0``, ``flag`` float32
  labels (the header's own ``label`` is then 0), then the encoded image (JPEG).
  The class label of an image is ``label`` (flag 0) or the first of the float
  labels (flag > 0), as insightface's ``MXFaceDataset`` takes it.
* Record 0 of insightface sets (made by ``face2rec2.py``) is a header record:
  flag 2, no image, labels ``(a, b)``. The images are records ``1 .. a - 1``,
  and records ``a .. b - 1`` are identity records, one per class in label
  order, whose labels ``(start, end)`` give that class's image range. When
  record 0 is an image (flag 0), every record is an image, in ``.idx`` order.
* ``property``: one text line ``num_classes,height,width``.

`RecordIOReader` gives random access to records and decoded images;
`write_recordio` writes a valid set in the same layout (for tests and for small
sets of your own). Decoding uses Pillow (RGB, as mxnet's ``imdecode``).

Reference: dmlc-core ``src/recordio.cc``; mxnet ``python/mxnet/recordio.py``;
insightface ``recognition/arcface_torch/dataset.py`` (``MXFaceDataset``).
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_IR_FORMAT = "<IfQQ"  # mxnet packs natively ('IfQQ'): the same 24 bytes on x86/ARM.
_IR_SIZE = struct.calcsize(_IR_FORMAT)
_LENGTH_MASK = (1 << 29) - 1


class IRHeader(NamedTuple):
    """insightface's image record header.

    ``label`` is a float (flag 0) or a float32 array of ``flag`` labels.
    """

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def pack(header: IRHeader, data: bytes = b"") -> bytes:
    """An ``IRHeader`` and image bytes as one payload (mxnet's recordio.pack)."""
    label = np.asarray(header.label, dtype=np.float32)
    if label.ndim == 0:
        head = struct.pack(_IR_FORMAT, 0, float(label), header.id, header.id2)
        return head + data
    head = struct.pack(_IR_FORMAT, label.size, 0.0, header.id, header.id2)
    return head + label.astype("<f4").tobytes() + data


def unpack(payload: bytes) -> tuple[IRHeader, bytes]:
    """(header, image bytes) of a payload (mxnet's recordio.unpack)."""
    if len(payload) < _IR_SIZE:
        raise ValueError(
            f"payload of {len(payload)} bytes is shorter than the "
            f"{_IR_SIZE}-byte IRHeader"
        )
    header = IRHeader(*struct.unpack(_IR_FORMAT, payload[:_IR_SIZE]))
    data = payload[_IR_SIZE:]
    if header.flag > 0:
        if len(data) < 4 * header.flag:
            raise ValueError(
                f"IRHeader flag {header.flag} announces {header.flag} float labels "
                f"but only {len(data)} bytes follow the header"
            )
        labels = np.frombuffer(data, dtype="<f4", count=header.flag).copy()
        header = header._replace(label=labels)
        data = data[4 * header.flag :]
    return header, data


def class_label(header: IRHeader) -> int:
    """The class of an image record: ``label``, or its first float label."""
    label = header.label
    if isinstance(label, np.ndarray):
        label = label[0]
    return int(label)


def _decode_image(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


class RecordIOReader:
    """Random access to an indexed RecordIO file pair (``.rec`` + ``.idx``).

    The ``.idx`` is read and every offset checked against the size of the
    ``.rec`` when the reader opens; records are read on demand. ``keys`` are all
    record keys in ``.idx`` order and ``len(reader) == len(reader.keys)``;
    ``image_keys`` are the image records only (``1 .. a - 1`` after an
    insightface header record, otherwise all keys), and ``header`` is that
    record's ``(a, b)`` or None. Use as a context manager or call `close`. One
    file position: open a reader per thread or process.

    Example::

        with RecordIOReader("ms1m/train.rec", "ms1m/train.idx") as reader:
            image, label = reader.read_image(reader.image_keys[0])

    Raises:
      ValueError (naming the file, and the key where there is one): a missing
      file, a malformed ``.idx`` line, an offset outside the ``.rec``, a bad
      magic number, a truncated or malformed record, a header record whose
      image range does not match the ``.idx``.
      KeyError: `read` of a key that is not in the ``.idx``.
    """

    def __init__(self, path_rec, path_idx):
        self.path_rec = os.fspath(path_rec)
        self.path_idx = os.fspath(path_idx)
        for path in (self.path_rec, self.path_idx):
            if not os.path.isfile(path):
                raise ValueError(f"RecordIO file {path!r} does not exist.")
        self._size = os.path.getsize(self.path_rec)
        self._offsets = self._read_idx()
        self.keys = list(self._offsets)
        self._file = open(self.path_rec, "rb")
        self.header = None
        self.image_keys = self.keys
        try:
            if self.keys:
                self._read_header()
        except BaseException:
            self.close()
            raise

    def _read_idx(self) -> dict[int, int]:
        offsets = {}
        with open(self.path_idx) as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    key, offset = (int(v) for v in line.strip().split("\t"))
                except ValueError:
                    raise ValueError(
                        f"RecordIO index {self.path_idx!r} line {n} is "
                        f"{line.strip()!r}, expected 'key<TAB>offset'."
                    ) from None
                if not 0 <= offset <= self._size - 8:
                    raise ValueError(
                        f"RecordIO index {self.path_idx!r}: key {key} has offset "
                        f"{offset}, out of range for {self.path_rec!r} "
                        f"({self._size} bytes)."
                    )
                offsets[key] = offset
        return offsets

    def _read_header(self) -> None:
        first = self.keys[0]
        header, _ = self.read_header(first)
        if header.flag <= 0:
            return
        end = int(header.label[0])
        self.header = (end, int(header.label[1]) if header.flag > 1 else end)
        self.image_keys = list(range(first + 1, end))
        missing = [k for k in (first + 1, end - 1) if k not in self._offsets]
        if end <= first + 1 or missing:
            raise ValueError(
                f"RecordIO file {self.path_rec!r}: header record {first} says the "
                f"images are keys {first + 1}..{end - 1}, but "
                + (
                    f"key {missing[0]} is not in {self.path_idx!r}."
                    if missing
                    else "that range is empty."
                )
            )

    def __len__(self) -> int:
        return len(self.keys)

    def __enter__(self) -> RecordIOReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def _fail(self, key, why: str) -> ValueError:
        return ValueError(f"RecordIO file {self.path_rec!r}, key {key}: {why}")

    def read(self, key: int) -> bytes:
        """The payload of record ``key`` (IRHeader + labels + image bytes)."""
        if key not in self._offsets:
            raise KeyError(f"key {key} is not in RecordIO index {self.path_idx!r}")
        position = self._offsets[key]
        self._file.seek(position)
        parts = []
        while True:
            head = self._file.read(8)
            if len(head) < 8:
                raise self._fail(
                    key, f"truncated: the file ends inside the record at {position}."
                )
            magic, lrecord = struct.unpack("<II", head)
            if magic != MAGIC:
                raise self._fail(
                    key,
                    f"bad magic 0x{magic:08x} at byte {position} (expected "
                    f"0x{MAGIC:08x}); the .idx does not match this .rec or the "
                    "file is corrupt.",
                )
            cflag, length = lrecord >> 29, lrecord & _LENGTH_MASK
            if cflag > 3 or (cflag in (0, 1)) != (not parts):
                raise self._fail(
                    key, f"malformed record: continuation flag {cflag} at {position}."
                )
            padded = (length + 3) // 4 * 4
            data = self._file.read(padded)
            if len(data) < padded:
                raise self._fail(
                    key,
                    f"truncated: the record at byte {position} has {length} bytes "
                    f"but the file ends after {len(data)}.",
                )
            parts.append(data[:length])
            position += 8 + padded
            if cflag in (0, 3):
                return _MAGIC_BYTES.join(parts)

    def read_header(self, key: int) -> tuple[IRHeader, bytes]:
        """(IRHeader, image bytes) of record ``key``."""
        payload = self.read(key)
        try:
            return unpack(payload)
        except ValueError as e:
            raise self._fail(key, f"malformed payload: {e}.") from None

    def read_encoded(self, key: int) -> tuple[bytes, int]:
        """(encoded image bytes, int class label) of image record ``key``.

        The image is not decoded; its header is checked (Pillow identifies
        the format and size without reading the pixels).
        """
        header, data = self.read_header(key)
        if not data:
            raise self._fail(
                key,
                f"not an image record (flag {header.flag}, no image bytes); "
                "the images are reader.image_keys.",
            )
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as img:
                img.size  # noqa: B018 - parsed from the header
        except Exception as e:  # Pillow raises many types for bad data
            raise self._fail(key, f"the image bytes are not an image: {e}") from e
        return data, class_label(header)

    def read_image(self, key: int) -> tuple[np.ndarray, int]:
        """(uint8 [H, W, 3] RGB image, int class label) of image record ``key``."""
        data, label = self.read_encoded(key)
        try:
            image = _decode_image(data)
        except Exception as e:  # Pillow raises many types for bad data
            raise self._fail(key, f"the image cannot be decoded: {e}") from e
        return image, label


def _encode_record(payload: bytes) -> bytes:
    """dmlc's RecordIOWriter::WriteRecord: split at aligned magics, pad to 4."""
    if len(payload) > _LENGTH_MASK:
        raise ValueError(f"a record holds at most 2^29 - 1 bytes, got {len(payload)}")
    out, start = [], 0
    for i in range(0, len(payload) - 3, 4):
        if payload[i : i + 4] == _MAGIC_BYTES:
            cflag = 1 if start == 0 else 2
            out += [
                struct.pack("<II", MAGIC, cflag << 29 | i - start),
                payload[start:i],
            ]
            start = i + 4
    tail = payload[start:]
    cflag = 3 if start else 0
    out += [struct.pack("<II", MAGIC, cflag << 29 | len(tail)), tail]
    out.append(b"\0" * (-len(tail) % 4))
    return b"".join(out)


def _encode_image(image, quality: int) -> bytes:
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    from PIL import Image

    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(
            "write_recordio: images must be uint8 [H, W, 3] RGB arrays or encoded "
            f"image bytes; got dtype {array.dtype} and shape {array.shape}."
        )
    buffer = io.BytesIO()
    # 4:4:4 (no chroma subsampling) keeps small images close to the originals.
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()


def _identity_ranges(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) image indices of each class in label order; [] if one is split."""
    starts = [i for i in range(len(labels)) if i == 0 or labels[i] != labels[i - 1]]
    ends = [*starts[1:], len(labels)]
    runs = sorted((labels[s], s, e) for s, e in zip(starts, ends, strict=True))
    if len({label for label, _, _ in runs}) != len(runs):
        return []
    return [(start, end) for _, start, end in runs]


def write_recordio(
    path_prefix,
    images: Sequence,
    labels: Sequence[int],
    *,
    header_record: bool = True,
    quality: int = 95,
    write_property: bool = True,
) -> tuple[str, str]:
    """Writes ``path_prefix.rec`` and ``path_prefix.idx`` in insightface's layout.

    Image i becomes record ``i + 1`` (``header_record``) or ``i``, with an
    IRHeader of flag 0, its label and id = its key. With ``header_record``,
    record 0 is the header (flag 2, labels ``(N + 1, N + 1 + C)``) and records
    ``N + 1 ..`` are the C identity records (labels ``(start, end)``), written
    only when each class's images are contiguous, as in insightface's sets
    (otherwise the header is ``(N + 1, N + 1)``: no identity records).

    Args:
      path_prefix: path without extension, e.g. ``"faces/train"``.
      images: N uint8 [H, W, 3] RGB arrays (or a uint8 [N, H, W, 3] array),
        encoded as JPEG with Pillow; entries that are ``bytes`` are stored as
        they are (already encoded images).
      labels: N integer class labels (0 .. C - 1 in insightface's sets).
      header_record: write insightface's header record 0 (and identity records).
      quality: JPEG quality.
      write_property: also write ``property`` (``C,H,W``, C = max label + 1)
        next to the files, when all images are arrays of one size.

    Returns:
      (path of the .rec, path of the .idx).
    """
    prefix = os.fspath(path_prefix)
    labels = [int(v) for v in np.asarray(labels).reshape(-1)]
    if len(images) != len(labels):
        raise ValueError(
            f"write_recordio: {len(images)} images but {len(labels)} labels."
        )
    if not labels:
        raise ValueError("write_recordio: no images to write.")
    n, base = len(labels), int(header_record)
    records = []  # (key, payload)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        payload = pack(IRHeader(0, label, base + i, 0), _encode_image(image, quality))
        records.append((base + i, payload))
    if header_record:
        ranges = _identity_ranges(labels)
        header = IRHeader(2, [n + 1, n + 1 + len(ranges)], 0, 0)
        records.insert(0, (0, pack(header)))
        for j, (start, end) in enumerate(ranges):
            key = n + 1 + j
            records.append((key, pack(IRHeader(2, [start + 1, end + 1], key, 0))))
    path_rec, path_idx = prefix + ".rec", prefix + ".idx"
    with open(path_rec, "wb") as rec, open(path_idx, "w") as idx:
        for key, payload in records:
            idx.write(f"{key}\t{rec.tell()}\n")
            rec.write(_encode_record(payload))
    arrays = [im for im in images if not isinstance(im, bytes | bytearray)]
    shapes = {np.shape(im) for im in arrays}
    if write_property and n and len(arrays) == n and len(shapes) == 1:
        height, width, _ = shapes.pop()
        directory = os.path.dirname(prefix) or "."
        with open(os.path.join(directory, "property"), "w") as f:
            f.write(f"{max(labels) + 1},{height},{width}\n")
    return path_rec, path_idx


def read_property(directory) -> tuple[int, int, int]:
    """(num_classes, height, width) from insightface's ``property`` file."""
    path = os.path.join(os.fspath(directory), "property")
    if not os.path.isfile(path):
        raise ValueError(f"RecordIO property file {path!r} does not exist.")
    with open(path) as f:
        text = f.read().strip()
    try:
        num_classes, height, width = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(
            f"RecordIO property file {path!r} holds {text!r}, expected "
            "'num_classes,height,width'."
        ) from None
    return num_classes, height, width
