"""A batch of embeddings [B, D], labels [B] and ``where`` [B]: checks and preparation.

The argument checks and the padded-row handling that the pair losses, the
miners and the centres share. Padded rows (``where=False``) are zeroed before
anything is computed from them, so garbage there never reaches a value or a
gradient (the double-where rule).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from margin_jax import _checks

__all__ = [
    "check_choice",
    "check_batch",
    "check_distances",
    "check_labels_in_range",
    "valid_rows",
    "prepare_embeddings",
]


def check_choice(value, name: str, choices: tuple, fn: str) -> None:
    """``value`` is one of the strings ``choices`` (a static option)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"{fn}: `{name}` must be one of {', '.join(map(repr, choices))}; "
            f"got {value!r}."
        )


def check_batch(embeddings, labels, where, fn: str) -> None:
    """Float embeddings [B, D], integer labels [B], optional bool where [B]."""
    _checks.check_rank(embeddings, 2, "embeddings", fn, "[B, D]")
    _checks.check_floating(embeddings, "embeddings", fn)
    shape = tuple(jnp.shape(embeddings))
    _checks.check_labels(labels, shape[0], fn, ref="embeddings", ref_shape=shape)
    _checks.check_where(where, shape[0], fn, ref="embeddings", ref_shape=shape)


def check_distances(distances, labels, where, fn: str) -> None:
    """Float square distances [B, B], integer labels [B], optional bool where [B]."""
    _checks.check_rank(distances, 2, "distances", fn, "[B, B]")
    _checks.check_floating(distances, "distances", fn)
    shape = tuple(jnp.shape(distances))
    if shape[0] != shape[1]:
        raise ValueError(f"{fn}: `distances` must be square [B, B]; got shape {shape}.")
    _checks.check_labels(labels, shape[0], fn, ref="distances", ref_shape=shape)
    _checks.check_where(where, shape[0], fn, ref="distances", ref_shape=shape)


def check_labels_in_range(
    labels, where, num_classes: int, fn: str, ref: str, ref_shape
) -> None:
    """Range check of the labels of valid rows only (eager calls).

    A padding label such as -1 under ``where=False`` is allowed. Call after the
    dtype, shape and ``where`` checks; traced labels are not checked.
    """
    if not (_checks.is_concrete(labels) and _checks.is_concrete(where)):
        return
    labels = np.asarray(labels)
    if where is not None:
        labels = np.where(np.asarray(where), labels, 0)
    _checks.check_labels(
        labels,
        labels.shape[0],
        fn,
        num_classes=num_classes,
        ref=ref,
        ref_shape=ref_shape,
    )


def valid_rows(where: ArrayLike | None, batch: int) -> jax.Array:
    """``where`` as a bool [B], all True when None."""
    if where is None:
        return jnp.ones((batch,), dtype=bool)
    return jnp.asarray(where, dtype=bool)


def prepare_embeddings(
    embeddings: ArrayLike, where: ArrayLike | None, dtype
) -> tuple[jax.Array, jax.Array]:
    """Embeddings [B, D] in ``dtype`` with padded rows zeroed, and the bool [B] mask.

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax.batch import prepare_embeddings
      >>> x, valid = prepare_embeddings(jnp.array([[1.0], [jnp.nan]]),
      ...                               jnp.array([True, False]), jnp.float32)
      >>> x.tolist(), valid.tolist()
      ([[1.0], [0.0]], [True, False])
    """
    x = jnp.asarray(embeddings, dtype=dtype)
    valid = valid_rows(where, x.shape[0])
    return jnp.where(valid[:, None], x, 0.0), valid
