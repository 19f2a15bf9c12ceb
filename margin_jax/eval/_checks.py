"""Argument checks and optional-dependency imports shared by `margin_jax.eval`.

Evaluation runs eagerly on concrete arrays (NumPy, or JAX arrays converted with
`np.asarray`), so, unlike the losses, these checks may look at values: NaN and
inf are rejected here rather than surfacing as a wrong number or a crash deep
inside a sort. Every message names the function, the argument and the shapes.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

_EXTRAS = {
    "sklearn": ("scikit-learn", "eval"),
    "scipy": ("scipy", "eval"),
    "PIL": ("pillow", "eval"),
    "matplotlib": ("matplotlib", "plots"),
}


def require(module: str, fn: str) -> Any:
    """Import an optional dependency, or raise ImportError saying how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        dist, extra = _EXTRAS.get(top, (top, "eval"))
        raise ImportError(
            f"{fn} needs the optional dependency {dist!r}, which is not installed. "
            f"Install it with `pip install margin-jax[{extra}]`."
        ) from err


def _shape(x) -> tuple:
    return tuple(np.shape(x))


def float_array(x, name: str, fn: str, *, rank: int, layout: str) -> np.ndarray:
    """A finite real array of the given rank, as float64 NumPy."""
    arr = np.asarray(x)
    if arr.ndim != rank:
        raise ValueError(
            f"{fn}: `{name}` must have rank {rank} with layout {layout}, got shape "
            f"{arr.shape} (rank {arr.ndim})."
        )
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise TypeError(
            f"{fn}: `{name}` must be a real (floating-point) array, got dtype "
            f"{arr.dtype} with shape {arr.shape}."
        )
    arr = arr.astype(np.float64, copy=False)
    finite = np.isfinite(arr)
    if not finite.all():
        bad = np.argwhere(~finite)[:5].tolist()
        raise ValueError(
            f"{fn}: `{name}` of shape {arr.shape} contains NaN or inf (first at "
            f"indices {bad}); evaluation metrics are undefined for non-finite values."
        )
    return arr


def embeddings_array(x, name: str, fn: str, *, dtype=np.float64) -> np.ndarray:
    """Finite embeddings [N, D] with N >= 1 and D >= 1."""
    arr = float_array(x, name, fn, rank=2, layout="[N, D]")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{fn}: `{name}` must be non-empty, got shape {arr.shape}.")
    return arr.astype(dtype, copy=False)


def _vector(x, name: str, fn: str, *, n: int, ref: str, ref_shape: tuple, dim: str):
    """``x`` as a NumPy array of shape (n,), the length of ``ref``'s first axis."""
    arr = np.asarray(x)
    if arr.shape != (n,):
        raise ValueError(
            f"{fn}: `{name}` must have shape [{dim}] = ({n},) to match `{ref}` of "
            f"shape {tuple(ref_shape)}; got `{name}` shape {arr.shape}."
        )
    return arr


def label_codes(labels, name: str, fn: str, *, n: int, ref: str, ref_shape: tuple):
    """1-D labels of length n (any hashable dtype) -> (codes [n] int, counts [C])."""
    arr = _vector(labels, name, fn, n=n, ref=ref, ref_shape=ref_shape, dim="N")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ValueError(f"{fn}: `{name}` contains NaN or inf.")
    _, codes, counts = np.unique(arr, return_inverse=True, return_counts=True)
    return codes.reshape(-1), counts


def bool_vector(x, name: str, fn: str, *, n: int, ref: str, ref_shape: tuple):
    """issame-style vector of length n: bool, or integers that are all 0/1."""
    arr = _vector(x, name, fn, n=n, ref=ref, ref_shape=ref_shape, dim="P")
    if arr.dtype != np.bool_:
        if not np.issubdtype(arr.dtype, np.number) or not np.isin(arr, (0, 1)).all():
            raise TypeError(
                f"{fn}: `{name}` must be boolean (True = same identity), or 0/1 "
                f"integers; got dtype {arr.dtype} with shape {arr.shape}."
            )
        arr = arr.astype(bool)
    return arr


def both_classes(same: np.ndarray, name: str, fn: str) -> None:
    n_same = int(same.sum())
    if n_same == 0 or n_same == same.size:
        raise ValueError(
            f"{fn}: `{name}` must contain both genuine (True) and impostor (False) "
            f"pairs; got {n_same} genuine out of {same.size}. Rates such as FAR "
            "and TAR are undefined with a single class."
        )
