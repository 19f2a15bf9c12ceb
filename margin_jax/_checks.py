"""Trace-time argument checks shared by every public function.

Shapes and dtypes are static under `jax.jit`, so these checks cost nothing at run
time: they run once while tracing and raise ``ValueError`` (shapes, values) or
``TypeError`` (dtypes) with a message that names the function, the argument and
the shapes involved. Label values are checked only when they are concrete (eager
calls); under `jit` out-of-range labels are undefined behaviour, as documented.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "compute_dtype",
    "is_concrete",
    "is_int",
    "check_floating",
    "check_rank",
    "check_labels",
    "check_where",
    "check_same_batch",
    "prepare_cos_labels",
    "check_embeddings_weights",
    "scale_vector",
]


def is_concrete(x) -> bool:
    """True when ``x`` has a value now (not a tracer inside jit/grad/vmap)."""
    return not isinstance(x, jax.core.Tracer)


def compute_dtype(*arrays) -> jnp.dtype:
    """The dtype losses compute in: the inputs' result type, at least float32.

    bf16 and fp16 are promoted to float32; float64 stays float64 (with x64 on).
    """
    dtype = jnp.result_type(*arrays) if arrays else jnp.float32
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    return jnp.promote_types(dtype, jnp.float32)


def is_int(x) -> bool:
    """A Python or NumPy integer, not a bool (for static sizes and counts)."""
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def _shape(x) -> tuple:
    return tuple(np.shape(x))


def check_floating(x, name: str, fn: str) -> None:
    dtype = jnp.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{fn}: `{name}` must be a floating-point array, got dtype {dtype} "
            f"with shape {_shape(x)}."
        )


def check_rank(x, rank: int, name: str, fn: str, layout: str) -> None:
    shape = _shape(x)
    if len(shape) != rank:
        raise ValueError(
            f"{fn}: `{name}` must have rank {rank} with layout {layout}, got shape "
            f"{shape} (rank {len(shape)})."
        )


def check_same_batch(x, y, x_name: str, y_name: str, fn: str) -> None:
    xs, ys = _shape(x), _shape(y)
    if xs[:1] != ys[:1]:
        raise ValueError(
            f"{fn}: `{x_name}` and `{y_name}` must have the same batch size; got "
            f"`{x_name}` shape {xs} and `{y_name}` shape {ys}."
        )


def check_labels(
    labels,
    batch: int,
    fn: str,
    *,
    num_classes: int | None = None,
    ref: str = "cos",
    ref_shape: tuple = (),
    name: str = "labels",
) -> None:
    """Integer labels of shape [B]; values in [0, num_classes) when concrete."""
    shape = _shape(labels)
    dtype = labels.dtype if hasattr(labels, "dtype") else np.asarray(labels).dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(
            f"{fn}: `{name}` must be an integer array of class indices, got dtype "
            f"{dtype} with shape {shape}."
        )
    if shape != (batch,):
        raise ValueError(
            f"{fn}: `{name}` must have shape [B] = ({batch},) to match `{ref}` of "
            f"shape {tuple(ref_shape)}; got `{name}` shape {shape}."
        )
    if num_classes is not None and is_concrete(labels) and batch > 0:
        values = np.asarray(labels)
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"{fn}: `{name}` must lie in [0, {num_classes}) for `{ref}` of shape "
                f"{tuple(ref_shape)}; got values in [{lo}, {hi}]. (Under jit, "
                "out-of-range labels are undefined behaviour and are not checked.)"
            )


def check_where(where, batch: int, fn: str, *, ref: str = "cos", ref_shape=()) -> None:
    """Optional boolean mask of shape [B]."""
    if where is None:
        return
    shape = _shape(where)
    dtype = where.dtype if hasattr(where, "dtype") else np.asarray(where).dtype
    if dtype != jnp.bool_:
        raise TypeError(
            f"{fn}: `where` must be a boolean array of shape ({batch},), got dtype "
            f"{dtype} with shape {shape}."
        )
    if shape != (batch,):
        raise ValueError(
            f"{fn}: `where` must have shape [B] = ({batch},) to match `{ref}` of "
            f"shape {tuple(ref_shape)}; got `where` shape {shape}."
        )


def prepare_cos_labels(fn: str, cos, labels, where=None, *, name: str = "cos"):
    """Validates (cos [B, C] float, labels [B] int, where [B] bool) and casts cos.

    Padded rows of ``cos`` are replaced by 0 so they can produce neither NaN nor
    gradient. Returns (cos in the compute dtype, labels, where-or-None).
    """
    check_floating(cos, name, fn)
    check_rank(cos, 2, name, fn, "[B, C]")
    cos = jnp.asarray(cos)
    batch, num_classes = cos.shape
    check_labels(
        labels, batch, fn, num_classes=num_classes, ref=name, ref_shape=cos.shape
    )
    check_where(where, batch, fn, ref=name, ref_shape=cos.shape)
    cos = cos.astype(compute_dtype(cos))
    labels = jnp.asarray(labels)
    if where is not None:
        where = jnp.asarray(where)
        cos = jnp.where(where[:, None], cos, 0.0)
    return cos, labels, where


def check_embeddings_weights(
    embeddings, weights, fn: str, *, weights_layout: str = "[C, D]"
) -> None:
    """Float embeddings [B, D] and class centres ``weights_layout`` sharing D."""
    check_floating(embeddings, "embeddings", fn)
    check_floating(weights, "weights", fn)
    check_rank(embeddings, 2, "embeddings", fn, "[B, D]")
    check_rank(weights, 2, "weights", fn, weights_layout)
    if np.shape(embeddings)[1] != np.shape(weights)[1]:
        raise ValueError(
            f"{fn}: `embeddings` [B, D] and `weights` {weights_layout} must share D; "
            f"got `embeddings` shape {_shape(embeddings)} and `weights` shape "
            f"{_shape(weights)}."
        )


def scale_vector(scale, batch: int, dtype, fn: str, *, where=None) -> jax.Array:
    """A scale given as a scalar or per example, as a vector [B].

    Padded rows (``where`` False) get scale 1, so they cannot produce inf/NaN.
    """
    s = jnp.asarray(scale, dtype)
    if s.ndim == 0:
        s = jnp.broadcast_to(s, (batch,))
    elif s.shape != (batch,):
        raise ValueError(
            f"{fn}: `scale` must be a scalar or have shape [B] = ({batch},); got "
            f"`scale` shape {s.shape}."
        )
    return s if where is None else jnp.where(where, s, 1.0)
