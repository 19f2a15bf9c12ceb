"""train.recordio and train.recordio_builder: insightface .rec/.idx sets."""

import os
import struct

import numpy as np
import pytest

from train import input_pipeline, prepare_recordio, recordio, recordio_builder

LABELS = [0] * 4 + [1] * 4 + [2] * 4


def _images(n=12, size=16):
    """Smooth (JPEG-friendly) and pairwise distinct RGB images."""
    y, x = np.mgrid[:size, :size] / (size - 1)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        a, b, c = (
            rng.uniform(20, 235, 3),
            rng.uniform(-60, 60, 3),
            rng.uniform(-60, 60, 3),
        )
        out.append(np.clip(a + b * x[..., None] + c * y[..., None], 0, 255))
    return [im.astype(np.uint8) for im in out]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    manual = tmp_path_factory.mktemp("manual")
    images = _images()
    recordio.write_recordio(manual / "train", images, LABELS)
    return manual, images


def _reader(directory, prefix="train"):
    return recordio.RecordIOReader(
        directory / f"{prefix}.rec", directory / f"{prefix}.idx"
    )


def _assert_close(decoded, original):
    assert decoded.shape == original.shape and decoded.dtype == np.uint8
    err = np.abs(decoded.astype(int) - original.astype(int))
    assert err.mean() < 2 and err.max() < 16


def test_round_trip_with_header_record(written):
    manual, images = written
    with _reader(manual) as reader:
        # Header, 12 images, 3 identity records with their image ranges.
        assert reader.keys == list(range(16)) and len(reader) == 16
        assert reader.header == (13, 16)
        assert reader.image_keys == list(range(1, 13))
        for key, original, label in zip(reader.image_keys, images, LABELS, strict=True):
            decoded, got = reader.read_image(key)
            assert type(got) is int and got == label
            _assert_close(decoded, original)
        ranges = [reader.read_header(k)[0].label.tolist() for k in (13, 14, 15)]
        assert ranges == [[1, 5], [5, 9], [9, 13]]
        with pytest.raises(ValueError, match="key 0: not an image record"):
            reader.read_image(0)
        with pytest.raises(KeyError, match="key 99"):
            reader.read(99)
    assert recordio.read_property(manual) == (3, 16, 16)


def test_round_trip_without_header_record(tmp_path):
    images, labels = _images(5), [2, 0, 1, 0, 2]
    recordio.write_recordio(tmp_path / "x", images, labels, header_record=False)
    with _reader(tmp_path, "x") as reader:
        assert reader.header is None and reader.image_keys == reader.keys == [
            0,
            1,
            2,
            3,
            4,
        ]
        got = [reader.read_image(k) for k in reader.image_keys]
    assert [label for _, label in got] == labels
    for (decoded, _), original in zip(got, images, strict=True):
        _assert_close(decoded, original)


def test_header_without_identity_records_when_classes_are_split(tmp_path):
    recordio.write_recordio(tmp_path / "train", _images(4), [0, 1, 0, 1])
    with _reader(tmp_path) as reader:
        assert reader.header == (5, 5) and reader.keys == [0, 1, 2, 3, 4]
        assert [reader.read_image(k)[1] for k in reader.image_keys] == [0, 1, 0, 1]


def test_payload_containing_the_magic_is_split_and_joined(tmp_path):
    # dmlc splits a payload at every 4-byte aligned magic (the IRHeader is 24
    # bytes, so aligned in the image bytes is aligned in the payload); an
    # unaligned magic stays as it is.
    magic = struct.pack("<I", recordio.MAGIC)
    data = magic + b"abcd" + magic + magic + b"x" + magic + b"yz" + magic
    recordio.write_recordio(tmp_path / "m", [data, b"plain"], [3, 4])
    with _reader(tmp_path, "m") as reader:
        assert reader.read_header(1)[1] == data
        assert reader.read_header(2)[1] == b"plain"
        assert reader.read_header(1)[0].label == 3.0
    raw = (tmp_path / "m.rec").read_bytes()
    offset = int((tmp_path / "m.idx").read_text().splitlines()[1].split("\t")[1])
    first_part = struct.unpack("<II", raw[offset : offset + 8])
    assert first_part == (recordio.MAGIC, 1 << 29 | 24)  # cflag 1: the header only


def _corrupt(tmp_path, edit_rec=None, extra_idx=""):
    images = _images(3)
    recordio.write_recordio(tmp_path / "train", images, [0, 1, 2], header_record=False)
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    if edit_rec:
        rec.write_bytes(edit_rec(rec.read_bytes(), idx.read_text()))
    if extra_idx:
        idx.write_text(idx.read_text() + extra_idx)
    return tmp_path


def _offset(idx_text, key):
    return dict(line.split("\t") for line in idx_text.splitlines())[str(key)]


def test_missing_file_names_it(tmp_path):
    _corrupt(tmp_path)
    with pytest.raises(ValueError, match=r"train\.rex.* does not exist"):
        recordio.RecordIOReader(tmp_path / "train.rex", tmp_path / "train.idx")
    with pytest.raises(ValueError, match=r"property.* does not exist"):
        recordio.read_property(tmp_path / "nowhere")


def test_bad_magic_names_file_and_key(tmp_path):
    def edit(raw, idx):
        at = int(_offset(idx, 2))
        return raw[:at] + b"\0\0\0\0" + raw[at + 4 :]

    with _reader(_corrupt(tmp_path, edit)) as reader:
        with pytest.raises(ValueError, match=r"train\.rec', key 2: bad magic"):
            reader.read_image(2)
        reader.read_image(1)  # the other records are intact


def test_truncated_record_names_file_and_key(tmp_path):
    with _reader(_corrupt(tmp_path, lambda raw, idx: raw[:-40])) as reader:
        with pytest.raises(ValueError, match=r"train\.rec', key 2: truncated"):
            reader.read(2)
        reader.read(1)


def test_offset_out_of_range_names_file_and_key(tmp_path):
    path = _corrupt(tmp_path, extra_idx="7\t123456789\n")
    with pytest.raises(ValueError, match=r"train\.idx.*key 7 has offset 123456789"):
        _reader(path)


def test_malformed_index_line(tmp_path):
    path = _corrupt(tmp_path, extra_idx="7 100\n")
    with pytest.raises(ValueError, match=r"train\.idx' line 4"):
        _reader(path)


def test_tfds_builder_from_manual_dir(written, tmp_path):
    manual, images = written
    data_dir = str(tmp_path / "tfds")
    assert (
        prepare_recordio.main(
            [str(manual), "--data_dir", data_dir, "--image_size", "16"]
        )
        == 0
    )
    # The input pipeline opens it by name, download=False semantics.
    records, labels = input_pipeline.open_source("insightface_recordio/16x16", data_dir)
    assert records.spec.image_shape == (16, 16, 3)
    assert sorted(labels.tolist()) == LABELS
    decoded = records.read(np.arange(len(labels)))
    assert decoded.shape == (12, 16, 16, 3) and decoded.dtype == np.uint8
    with _reader(manual) as reader:
        expected = [reader.read_image(k) for k in reader.image_keys]
        encoded = {reader.read_encoded(k)[0] for k in reader.image_keys}
    # The prepared set keeps the .rec's JPEG bytes as they are.
    source = input_pipeline.get_builder(
        "insightface_recordio/16x16", data_dir
    ).as_data_source("train")
    assert {source[i]["image"] for i in range(12)} == encoded
    # tfds shuffles the examples: match them up by content, labels must follow.
    for image, label in zip(decoded, labels, strict=True):
        i = int(np.argmin([np.abs(image.astype(int) - e).sum() for e, _ in expected]))
        np.testing.assert_array_equal(image, expected[i][0])
        assert label == expected[i][1] == LABELS[i]
        _assert_close(image, images[i])


def test_prepared_set_is_about_the_size_of_the_rec(tmp_path):
    images = _images(300, 32)
    recordio.write_recordio(tmp_path / "train", images, [i % 6 for i in range(300)])
    builder = recordio_builder.prepare_recordio(
        tmp_path, str(tmp_path / "tfds"), image_size=32
    )
    stored = sum(
        os.path.getsize(os.path.join(builder.data_dir, f))
        for f in os.listdir(builder.data_dir)
        if ".array_record" in f
    )
    rec = os.path.getsize(tmp_path / "train.rec")
    decoded = 300 * 32 * 32 * 3  # 922 kB; array_record pads to 64 kB blocks
    assert stored < rec + 2**17 < decoded / 2


def test_tfds_builder_resizes_to_the_config(written, tmp_path):
    manual, _ = written
    recordio_builder.prepare_recordio(manual, str(tmp_path), image_size=(8, 4))
    records, _ = input_pipeline.open_source("insightface_recordio/8x4", str(tmp_path))
    assert records.read([0, 5]).shape == (2, 8, 4, 3)


def test_corrupt_rec_stops_the_preparation_with_what_to_do(tmp_path, capsys):
    def edit(raw, idx):
        at = int(_offset(idx, 2))
        return raw[:at] + b"\0\0\0\0" + raw[at + 4 :]

    _corrupt(tmp_path, edit)
    code = prepare_recordio.main([str(tmp_path), "--data_dir", str(tmp_path / "tfds")])
    err = capsys.readouterr().err
    assert code == 1
    assert "key 2: bad magic" in err and "Copy train.rec and train.idx again" in err
    assert (
        recordio_builder.prepared_builder(
            "insightface_recordio/112x112", str(tmp_path / "tfds")
        )
        is None
    )


def test_bad_image_bytes_stop_the_preparation(tmp_path, capsys):
    recordio.write_recordio(tmp_path / "train", [b"not an image", b"x"], [0, 1])
    code = prepare_recordio.main([str(tmp_path), "--data_dir", str(tmp_path / "tfds")])
    assert code == 1
    assert "key 1: the image bytes are not an image" in capsys.readouterr().err


def test_image_size_argument():
    assert prepare_recordio.parse_size("112") == (112, 112)
    assert prepare_recordio.parse_size("112x96") == (112, 96)
    with pytest.raises(Exception, match="S or HxW"):
        prepare_recordio.parse_size("big")


def test_tfds_builder_needs_the_files(tmp_path):
    (tmp_path / "train.idx").write_text("")
    with pytest.raises(ValueError, match=r"train\.rec' not found"):
        recordio_builder.prepare_recordio(tmp_path, str(tmp_path / "tfds"))


def test_not_prepared_gives_none_and_the_command(tmp_path):
    name = "insightface_recordio/64x64"
    assert recordio_builder.prepared_builder(name, str(tmp_path)) is None
    message = recordio_builder.prepare_message(name, str(tmp_path))
    assert "python -m train.prepare_recordio MANUAL_DIR" in message
    assert "--image_size 64x64" in message
