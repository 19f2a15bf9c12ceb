"""The cross-device rule: what ``axis_name`` means and how a global sum is taken.

Every batch-statistic function of margin_jax (the pair and triplet losses, the
two-head regulariser, hard-example mining, the AdaCos scale, CurricularFace's
t, the centre update), the class-sharded loss, Partial FC and `top1_classes`
take ``axis_name`` and reduce over it only through the primitives of this
module; none writes its own ``all_gather`` or ``psum``. The reference train
step (``train/train.py``) follows the rule below: its objective is
`global_mean` of the per-example losses and it psums the gradients.

``axis_name``:
  ``None`` means one device: the local batch is the whole batch and every
  primitive here is the identity (or a plain local sum). Otherwise it is the
  name of a mapped axis of ``jax.pmap`` or ``jax.shard_map`` (or a tuple of such
  names, reduced over together) along which the global batch is split into
  equal local batches of B rows, device k holding rows [k·B, (k + 1)·B) of the
  concatenated batch (`axis_offset`).

The gradient rule:
  A quantity over the global batch (a sum, a mean, a statistic) is computed on
  every device and its value equals the single-device value on the
  concatenated batch. Its gradient on each device is the gradient of that
  device's own share: the terms of its own rows, and, through the transpose of
  `gather` (a sum over the axis), the other devices' terms that depend on its
  own rows. The gradient of a device's own inputs is therefore exactly the
  single-device gradient for those rows. The gradient of a *replicated*
  parameter is the sum of the devices' shares, so it must be SUMMED over the
  axis (``lax.psum``), never averaged (``pmean`` would divide it by the number
  of devices). Under ``pmap`` (and ``shard_map`` with ``check_vma=False``) the
  step writes that psum; under ``shard_map`` with ``check_vma=True`` the
  gradient with respect to an invariant (``P()``) input already is that psum
  (JAX transposes the implicit cast to device-varying into it), so it must not
  be summed again. Counts and statistics that carry no gradient are plain
  psums (`psum_no_grad`).

`global_sum` implements the rule for both maps: under ``shard_map`` with
``check_vma=True`` a device-varying partial sum is ``psum``-ed (whose transpose
is then a broadcast: the device's share); under ``pmap`` (and ``shard_map``
with ``check_vma=False``) ``psum`` would transpose to another ``psum`` and
multiply the gradient by the number of devices, so the value is the psum but
the gradient flows through the local partial only.

Example, a mean over the global batch and the gradient of a replicated
parameter (summed over the axis)::

    def loss(w, x, where):
        return global_mean(jnp.sum((x - w) ** 2, -1), where=where, axis_name="d")

    grads = jax.pmap(
        lambda w, x, m: lax.psum(jax.grad(loss)(w, x, m), "d"), axis_name="d"
    )(w_replicated, x_sharded, where_sharded)
"""

from __future__ import annotations

from collections.abc import Hashable

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

__all__ = [
    "AxisName",
    "axis_names",
    "axis_size",
    "axis_index",
    "axis_offset",
    "gather",
    "stack",
    "local_rows",
    "psum_no_grad",
    "varying_axes",
    "global_sum",
    "global_mean",
]

AxisName = Hashable | tuple[Hashable, ...] | None
"""A pmap / shard_map axis name, a tuple of them, or None (one device)."""


def axis_names(axis_name: AxisName) -> tuple:
    """The names of ``axis_name`` as a tuple (empty for None).

    Example:
      >>> from margin_jax.collective import axis_names
      >>> axis_names(None), axis_names("d"), axis_names(("x", "y"))
      ((), ('d',), ('x', 'y'))
    """
    if axis_name is None:
        return ()
    return axis_name if isinstance(axis_name, tuple) else (axis_name,)


def axis_size(axis_name: AxisName) -> int:
    """Number of devices along ``axis_name`` (1 for None).

    Example:
      >>> from margin_jax.collective import axis_size
      >>> axis_size(None)
      1
    """
    if axis_name is None:
        return 1
    return lax.axis_size(axis_name)


def axis_index(axis_name: AxisName) -> jax.Array | int:
    """This device's position along ``axis_name`` (0 for None)."""
    if axis_name is None:
        return 0
    return lax.axis_index(axis_name)


def axis_offset(batch: int, axis_name: AxisName) -> jax.Array | int:
    """Global index of this device's first row: ``axis_index · batch``.

    Args:
      batch: B, the number of local rows (static).
      axis_name: see the module docstring.
    """
    return axis_index(axis_name) * batch


def gather(x: ArrayLike, axis_name: AxisName) -> jax.Array:
    """The global batch: ``x`` [B, ...] of every device, concatenated [n·B, ...].

    A tiled ``all_gather`` along axis 0 (the identity for None). Its transpose
    sums the cotangents of all devices, which is how the other devices' terms
    that depend on this device's rows reach its gradient.

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax.collective import gather
      >>> gather(jnp.arange(3), None).tolist()
      [0, 1, 2]
    """
    x = jnp.asarray(x)
    if axis_name is None:
        return x
    return lax.all_gather(x, axis_name, axis=0, tiled=True)


def stack(x: ArrayLike, axis_name: AxisName) -> jax.Array:
    """Every device's ``x``, stacked on a new leading axis [n_devices, ...].

    For partial results that every device then uses whole, such as the
    class-sharded loss's per-shard sums (each device needs every shard's sum for
    the rows it keeps): the transpose of the stack is a sum over the axis, so a
    device's partial receives the gradient from every device that used it. (A
    `global_sum` is the other case: each device keeps only its own share.)
    For None, ``x[None]``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from margin_jax.collective import stack
      >>> n = jax.local_device_count()
      >>> out = jax.pmap(lambda x: stack(x, "d"), axis_name="d")(jnp.arange(n))
      >>> out.shape == (n, n)
      True
    """
    x = jnp.asarray(x)
    return x[None] if axis_name is None else lax.all_gather(x, axis_name)


def local_rows(x_global: ArrayLike, batch: int, axis_name: AxisName) -> jax.Array:
    """This device's rows [B, ...] of a global array [n·B, ...] (inverse of `gather`).

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax.collective import local_rows
      >>> local_rows(jnp.arange(4), 4, None).tolist()
      [0, 1, 2, 3]
    """
    x_global = jnp.asarray(x_global)
    if axis_name is None:
        return x_global
    return lax.dynamic_slice_in_dim(x_global, axis_offset(batch, axis_name), batch)


def psum_no_grad(x, axis_name: AxisName):
    """Sum over the axis of a pytree that carries no gradient (counts, statistics).

    The leaves are stop-gradient; the identity for None.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from margin_jax.collective import psum_no_grad
      >>> jax.pmap(lambda n: psum_no_grad(n, "d"), axis_name="d")(jnp.ones(1)).tolist()
      [1.0]
    """
    x = jax.tree.map(lax.stop_gradient, x)
    return x if axis_name is None else lax.psum(x, axis_name)


def varying_axes(x) -> frozenset:
    """The shard_map axes along which ``x`` is typed as device-varying.

    Empty outside ``shard_map``, under ``pmap`` and with ``check_vma=False``.
    """
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    if mat is not None:
        return frozenset(getattr(mat, "varying", ()))
    return frozenset(getattr(aval, "vma", ()))


# The old private name, still imported by margin_jax.chunked.
_varying_axes = varying_axes


def global_sum(partial: ArrayLike, axis_name: AxisName) -> jax.Array:
    """Σ over devices of a partial sum: the global value, the device's share's gradient.

    The value is ``psum(partial)`` on every device. The gradient is that of
    ``partial`` alone (the module's rule), under ``pmap`` and ``shard_map``
    alike: with ``check_vma=True`` and a varying partial, ``psum`` already
    transposes to a broadcast; otherwise the gradient is routed through the
    local partial, since ``psum`` would transpose to another ``psum`` and
    multiply it by the number of devices.

    Args:
      partial: this device's partial sum (any shape, usually a scalar).
      axis_name: see the module docstring.

    Returns:
      The global sum, same shape as ``partial``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from margin_jax.collective import global_sum
      >>> f = jax.pmap(jax.grad(lambda x: global_sum(3.0 * x, "d")), axis_name="d")
      >>> f(jnp.ones(1)).tolist()  # 3, not 3 × the number of devices
      [3.0]
    """
    partial = jnp.asarray(partial)
    if axis_name is None:
        return partial
    total = lax.psum(partial, axis_name)
    if all(name in varying_axes(partial) for name in axis_names(axis_name)):
        return total
    return partial + lax.stop_gradient(total - partial)


def global_mean(
    values: ArrayLike,
    *,
    where: ArrayLike | None = None,
    axis_name: AxisName = None,
) -> jax.Array:
    """Mean of the valid values over the global batch; 0 when none is valid.

    mean = `global_sum`(Σ_valid v) / max(global count of valid entries, 1). The
    value is the global mean on every device; the gradient is this device's
    share (its own values' terms), so a replicated parameter's gradient is the
    psum over the axis of the per-device gradients.

    Args:
      values: float array of any shape (e.g. per-example losses [B]).
      where: optional bool, same shape as ``values``; False entries do not count
        (and get no gradient, even when they are inf or NaN).
      axis_name: see the module docstring.

    Returns:
      Scalar in the dtype of ``values``.

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax.collective import global_mean
      >>> v, m = jnp.array([1.0, 2.0, jnp.nan]), jnp.array([True, True, False])
      >>> float(global_mean(v, where=m))
      1.5
    """
    values = jnp.asarray(values)
    valid = jnp.ones(values.shape, bool) if where is None else jnp.asarray(where, bool)
    total = global_sum(jnp.sum(jnp.where(valid, values, 0)), axis_name)
    count = psum_no_grad(jnp.sum(valid, dtype=jnp.int32), axis_name)
    return total / jnp.maximum(count, 1).astype(total.dtype)
