"""Read and write insightface verification sets (lfw.bin, cfp_fp.bin, agedb_30.bin).

A `.bin` file is a pickle of ``(bins, issame_list)``: `bins` holds 2P encoded
images (JPEG or PNG bytes; in some files NumPy uint8 arrays of those bytes),
pair i being images 2i and 2i + 1, and `issame_list` holds P booleans. Most
published files were written by Python 2, so they are read with
``encoding='bytes'`` as insightface does.

Safety: a pickle can run arbitrary code when loaded. `load_bin` uses a
restricted unpickler that resolves only the few globals these files need
(NumPy's array and scalar reconstruction, `numpy.dtype`, `_codecs.encode` and
plain builtin containers); any other global (os.system, eval, a class from a
module, ...) makes it raise ValueError before anything is called. It is still
wise to load files only from sources you trust.
"""

from __future__ import annotations

import io
import os
import pickle

import numpy as np

from margin_jax.eval import _checks

__all__ = ["load_bin", "write_bin"]


def _numpy_attr(module: str, name: str):
    # NumPy 2 moved numpy.core to numpy._core; files name either.
    try:
        core = __import__("numpy._core." + module, fromlist=[name])
    except ImportError:  # NumPy 1.x
        core = __import__("numpy.core." + module, fromlist=[name])
    return getattr(core, name)


def _allowed_globals() -> dict:
    allowed = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): __import__("codecs").encode,
    }
    for pkg in ("numpy.core", "numpy._core"):
        allowed[(pkg + ".multiarray", "_reconstruct")] = _numpy_attr(
            "multiarray", "_reconstruct"
        )
        allowed[(pkg + ".multiarray", "scalar")] = _numpy_attr("multiarray", "scalar")
        allowed[(pkg + ".numeric", "_frombuffer")] = _numpy_attr(
            "numeric", "_frombuffer"
        )
    for mod in ("builtins", "__builtin__"):
        for name, obj in (
            ("bytes", bytes),
            ("bytearray", bytearray),
            ("bool", bool),
            ("int", int),
            ("list", list),
            ("tuple", tuple),
        ):
            allowed[(mod, name)] = obj
    return allowed


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only an allow-list of harmless globals."""

    _allowed = None

    def find_class(self, module, name):
        if _RestrictedUnpickler._allowed is None:
            _RestrictedUnpickler._allowed = _allowed_globals()
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise _ForbiddenGlobal(f"{module}.{name}") from None


def _fail(path, why: str) -> ValueError:
    return ValueError(f"load_bin: {os.fspath(path)!r} {why}")


def _as_encoded_bytes(item, i, path) -> bytes:
    if isinstance(item, bytes | bytearray):
        return bytes(item)
    if (
        isinstance(item, np.ndarray)
        and item.dtype in (np.uint8, np.int8)
        and item.ndim == 1
    ):
        return item.tobytes()
    raise _fail(
        path,
        f"is not an insightface verification set: image {i} is a "
        f"{type(item).__name__}"
        + (
            f" of dtype {item.dtype} and shape {item.shape}"
            if hasattr(item, "dtype")
            else ""
        )
        + ", expected encoded image bytes (or a 1-D uint8 array of them).",
    )


def _as_issame(issame, n_pairs, path) -> np.ndarray:
    if isinstance(issame, np.ndarray):
        values = issame.reshape(-1).tolist() if issame.ndim == 1 else None
    elif isinstance(issame, list | tuple):
        values = list(issame)
    else:
        values = None
    if values is None:
        raise _fail(
            path,
            "is not an insightface verification set: the issame list is a "
            f"{type(issame).__name__}, expected a list of booleans.",
        )
    ok = all(
        isinstance(v, bool | np.bool_ | int | np.integer) and v in (0, 1)
        for v in values
    )
    if not ok:
        raise _fail(path, "has an issame list whose entries are not all booleans.")
    if len(values) != n_pairs:
        raise _fail(
            path,
            f"holds {2 * n_pairs} images ({n_pairs} pairs) but its issame list has "
            f"{len(values)} entries; they must match (len(issame) == N // 2).",
        )
    return np.asarray(values, dtype=bool).reshape(n_pairs)


def _decode(data: bytes, i: int, path) -> np.ndarray:
    image_mod = _checks.require("PIL.Image", "load_bin")
    try:
        with image_mod.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Exception as err:  # Pillow raises many types for bad data
        raise _fail(
            path, f"has an image that cannot be decoded (image {i}): {err}"
        ) from err


def load_bin(path) -> tuple[np.ndarray, np.ndarray]:
    """Load an insightface verification set `.bin` into arrays.

    The file is a pickle of (bins, issame_list), read with
    ``encoding='bytes'`` through a restricted unpickler (only NumPy array
    reconstruction and builtin containers are resolved, so a malicious file
    cannot run code). Each encoded image is decoded with Pillow into RGB (as
    mxnet's imdecode, which insightface uses); grayscale images become 3
    channels. insightface resizes images whose width differs from the model's
    input; this loader returns them as stored and requires one common size.

    Args:
      path: path of the `.bin` file.

    Returns:
      (images, issame): uint8 [N, H, W, 3] RGB images, pair i being images 2i
      and 2i + 1, and bool [N // 2].

    Raises:
      ValueError (naming the file): unreadable, corrupt or truncated pickle; a
      disallowed global; not a (bins, issame) pair; an odd number of images;
      len(issame) != N // 2; an entry that is not encoded bytes; an image
      that does not decode; images of different sizes.
      ImportError: Pillow is not installed (``pip install margin-jax[eval]``).

    Example:
      >>> import os, tempfile, numpy as np
      >>> images = np.zeros((4, 8, 8, 3), np.uint8)
      >>> path = os.path.join(tempfile.mkdtemp(), "toy.bin")
      >>> write_bin(path, images, [True, False])
      >>> images, issame = load_bin(path)
      >>> images.shape, issame.tolist()
      ((4, 8, 8, 3), [True, False])

    References:
      insightface recognition/arcface_torch/eval/verification.py
      (``load_bin``); the files ship with insightface's training datasets.
    """
    with open(path, "rb") as f:
        try:
            obj = _RestrictedUnpickler(f, encoding="bytes").load()
        except _ForbiddenGlobal as err:
            raise _fail(
                path,
                f"asks to load the global {err}; refusing to unpickle it (a "
                "verification set holds only encoded images and booleans, and "
                "other globals could run arbitrary code).",
            ) from None
        except Exception as err:  # truncated or corrupt data raise many types
            raise _fail(
                path,
                "is not a readable insightface verification set (corrupt or "
                f"truncated pickle): {type(err).__name__}: {err}",
            ) from err
    if not isinstance(obj, tuple | list) or len(obj) != 2:
        raise _fail(
            path,
            "is not an insightface verification set: expected a pickled pair "
            f"(bins, issame_list), got {type(obj).__name__}"
            + (f" of length {len(obj)}" if isinstance(obj, tuple | list) else "")
            + ".",
        )
    bins, issame = obj
    if not isinstance(bins, list | tuple):
        raise _fail(
            path,
            "is not an insightface verification set: `bins` is a "
            f"{type(bins).__name__}, expected a list of encoded images.",
        )
    if len(bins) % 2:
        raise _fail(
            path,
            f"holds an odd number of images ({len(bins)}); pairs need an even number.",
        )
    same = _as_issame(issame, len(bins) // 2, path)
    encoded = [_as_encoded_bytes(item, i, path) for i, item in enumerate(bins)]
    images = None
    for i, data in enumerate(encoded):
        img = _decode(data, i, path)
        if images is None:
            images = np.empty((len(encoded),) + img.shape, np.uint8)
        elif img.shape != images.shape[1:]:
            raise _fail(
                path,
                f"has images of different sizes: image 0 is {images.shape[1:]}, "
                f"image {i} is {img.shape} (H, W, C).",
            )
        images[i] = img
    if images is None:
        images = np.zeros((0, 0, 0, 3), np.uint8)
    return images, same


def write_bin(
    path,
    images,
    issame,
    *,
    image_format: str = "png",
    quality: int = 95,
) -> None:
    """Write images and pair labels as an insightface verification set `.bin`.

    The inverse of `load_bin`: a pickle (protocol 4) of (list of encoded
    image bytes, list of bool), readable by insightface's own loader. PNG (the
    default) is lossless, so `load_bin` returns the images bit for bit; JPEG
    (as the published files) is smaller but lossy.

    Args:
      path: output file.
      images: uint8 [N, H, W, 3] RGB (or [N, H, W] grayscale), N even; pair
        i is images 2i and 2i + 1.
      issame: bool [N // 2], True for genuine pairs.
      image_format: 'png' or 'jpeg'.
      quality: JPEG quality (ignored for PNG).

    Example:
      >>> import os, tempfile, numpy as np
      >>> path = os.path.join(tempfile.mkdtemp(), "pairs.bin")
      >>> write_bin(path, np.zeros((2, 4, 4, 3), np.uint8), [True])
      >>> os.path.getsize(path) > 0
      True
    """
    fn = "write_bin"
    arr = np.asarray(images)
    if (
        arr.dtype != np.uint8
        or arr.ndim not in (3, 4)
        or (arr.ndim == 4 and arr.shape[-1] != 3)
    ):
        raise ValueError(
            f"{fn}: `images` must be uint8 [N, H, W, 3] (or [N, H, W]); got dtype "
            f"{arr.dtype} with shape {arr.shape}."
        )
    if arr.shape[0] % 2:
        raise ValueError(
            f"{fn}: `images` must hold an even number of images (pair i = images "
            f"2i, 2i + 1); got shape {arr.shape}."
        )
    same = _checks.bool_vector(
        issame,
        "issame",
        fn,
        n=arr.shape[0] // 2,
        ref="images // 2",
        ref_shape=arr.shape,
    )
    fmt = image_format.lower()
    if fmt not in ("png", "jpeg", "jpg"):
        raise ValueError(
            f"{fn}: `image_format` must be 'png' or 'jpeg', got {image_format!r}."
        )
    image_mod = _checks.require("PIL.Image", fn)
    bins = []
    for img in arr:
        buf = io.BytesIO()
        pil = image_mod.fromarray(img)
        if fmt == "png":
            pil.save(buf, format="PNG")
        else:
            pil.save(buf, format="JPEG", quality=quality)
        bins.append(buf.getvalue())
    with open(path, "wb") as f:
        pickle.dump((bins, [bool(s) for s in same]), f, protocol=4)
