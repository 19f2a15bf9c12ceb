"""Tests for load_bin / write_bin (insightface verification .bin files)."""

import io
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from margin_jax.eval import evaluate_bin, load_bin, write_bin


def _images(n=6, h=9, w=7, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def _png(img) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _py2_pickle(bins, issame) -> bytes:
    """(bins, issame) as Python 2's cPickle protocol 2 writes it: str opcodes."""
    out = [b"\x80\x02", b"]", b"("]  # PROTO 2, EMPTY_LIST, MARK
    for data in bins:
        out.append(b"T" + struct.pack("<i", len(data)) + data)  # BINSTRING
    out += [b"e", b"]", b"("]  # APPENDS, EMPTY_LIST, MARK
    out += [b"\x88" if s else b"\x89" for s in issame]  # NEWTRUE / NEWFALSE
    out += [b"e", b"\x86", b"."]  # APPENDS, TUPLE2, STOP
    return b"".join(out)


def _write(tmp_path, payload: bytes, name="set.bin"):
    path = tmp_path / name
    path.write_bytes(payload)
    return path


def test_write_then_load_is_identical(tmp_path):
    images = _images()
    issame = np.array([True, False, True])
    path = tmp_path / "pairs.bin"
    write_bin(path, images, issame)
    got, same = load_bin(path)
    assert got.dtype == np.uint8 and got.shape == (6, 9, 7, 3)
    np.testing.assert_array_equal(got, images)
    assert same.dtype == np.bool_ and same.tolist() == [True, False, True]
    # insightface's own reader (plain pickle) sees (list of bytes, list of bool).
    with open(path, "rb") as f:
        bins, issame_list = pickle.load(f, encoding="bytes")
    assert isinstance(bins[0], bytes) and issame_list == [True, False, True]


def test_jpeg_and_grayscale(tmp_path):
    images = np.full((2, 8, 8, 3), 128, np.uint8)
    write_bin(tmp_path / "j.bin", images, [True], image_format="jpeg", quality=90)
    got, _ = load_bin(tmp_path / "j.bin")
    assert got.shape == (2, 8, 8, 3)
    assert np.abs(got.astype(int) - 128).max() <= 2  # lossy, but close
    gray = np.arange(2 * 5 * 5, dtype=np.uint8).reshape(2, 5, 5)
    write_bin(tmp_path / "g.bin", gray, [False])
    got, _ = load_bin(tmp_path / "g.bin")
    np.testing.assert_array_equal(got, np.repeat(gray[..., None], 3, axis=-1))


def test_loads_python2_pickle_as_published(tmp_path):
    images = _images(n=4)
    path = _write(tmp_path, _py2_pickle([_png(im) for im in images], [True, False]))
    got, same = load_bin(path)
    np.testing.assert_array_equal(got, images)
    assert same.tolist() == [True, False]


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_loads_numpy_array_bins_and_numpy_bools(tmp_path, protocol):
    images = _images(n=4)
    bins = [np.frombuffer(_png(im), dtype=np.uint8) for im in images]
    issame = [np.bool_(True), np.bool_(False)]
    path = _write(tmp_path, pickle.dumps((bins, issame), protocol=protocol))
    got, same = load_bin(path)
    np.testing.assert_array_equal(got, images)
    assert same.tolist() == [True, False]
    # A NumPy bool array as the issame list also loads.
    arr_path = _write(tmp_path, pickle.dumps((bins, np.array([1, 0], bool))), "a.bin")
    assert load_bin(arr_path)[1].tolist() == [True, False]


def test_refuses_to_run_code_from_a_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = _write(tmp_path, pickle.dumps(([Evil(), b"x"], [True])))
    with pytest.raises(ValueError, match=r"the global io\.open; refusing to unpickle"):
        load_bin(path)
    assert not marker.exists()


def _bad_payloads():
    png = _png(_images(n=1)[0])
    small = _png(_images(n=1, h=4, w=4)[0])
    good = pickle.dumps(([png, png], [True]))
    return {
        "corrupt": (b"\x00garbage that is not a pickle" * 3, "corrupt or truncated"),
        "truncated": (good[: len(good) // 2], "corrupt or truncated"),
        "empty file": (b"", "corrupt or truncated"),
        "dict": (pickle.dumps({"bins": [png, png]}), "expected a pickled pair"),
        "3-tuple": (pickle.dumps(([png, png], [True], 1)), r"dict|of length 3"),
        "bins not a list": (pickle.dumps(({0: png}, [True])), "`bins` is a dict"),
        "odd count": (pickle.dumps(([png, png, png], [True])), "odd number of images"),
        "issame too long": (
            pickle.dumps(([png, png], [True, False])),
            r"issame list has 2 entries",
        ),
        "issame not bool": (pickle.dumps(([png, png], ["yes"])), "not all booleans"),
        "issame not a list": (pickle.dumps(([png, png], 1)), "issame list is a int"),
        "item not bytes": (pickle.dumps(([png, 3], [True])), "image 1 is a int"),
        "undecodable": (pickle.dumps(([png, b"not an image"], [True])), "image 1"),
        "truncated image": (pickle.dumps(([png, png[:40]], [True])), "image 1"),
        "sizes differ": (pickle.dumps(([png, small], [True])), "different sizes"),
    }


@pytest.mark.parametrize("case", list(_bad_payloads()))
def test_bad_files_raise_clear_errors_naming_the_file(tmp_path, case):
    payload, message = _bad_payloads()[case]
    path = _write(tmp_path, payload, name="broken_set.bin")
    with pytest.raises(ValueError, match=message) as info:
        load_bin(path)
    assert "broken_set.bin" in str(info.value)


def test_write_bin_errors(tmp_path):
    with pytest.raises(ValueError, match="even number"):
        write_bin(tmp_path / "x.bin", _images(n=3), [True])
    with pytest.raises(ValueError, match="uint8"):
        write_bin(tmp_path / "x.bin", _images(n=2).astype(np.float32), [True])
    with pytest.raises(ValueError, match=r"`issame` must have shape \[P\] = \(1,\)"):
        write_bin(tmp_path / "x.bin", _images(n=2), [True, False])
    with pytest.raises(ValueError, match="image_format"):
        write_bin(tmp_path / "x.bin", _images(n=2), [True], image_format="gif")


def test_evaluate_bin_end_to_end(tmp_path):
    # Genuine pairs are the same picture; impostors are unrelated pictures.
    rng = np.random.default_rng(0)
    first = rng.integers(0, 256, size=(40, 6, 6, 3), dtype=np.uint8)
    other = rng.integers(0, 256, size=(40, 6, 6, 3), dtype=np.uint8)
    issame = np.arange(40) % 2 == 0
    second = np.where(issame[:, None, None, None], first, other)
    images = np.stack([first, second], axis=1).reshape(80, 6, 6, 3)
    write_bin(tmp_path / "toy.bin", images, issame)
    calls = []

    def embed(x):
        calls.append(len(x))
        return np.asarray(x, np.float32).reshape(len(x), -1) - 127.5

    out = evaluate_bin(tmp_path / "toy.bin", embed, batch_size=32)
    assert set(calls) == {32}
    assert out["mean"] == 1.0 and out["accuracy"].shape == (10,)
