"""Center loss with the class centres as explicit state (Wen et al. 2016).

The centres are not parameters: they live in a `CenterState` pytree that the
caller carries next to the optimiser state, never inside it. `center_loss`
gives gradient to the embeddings only; `update_centers` moves the centres with
the rule of the paper, without gradient::

    state = init_centers(num_classes, dim)
    def step(params, opt_state, centers, batch):
        def loss_fn(params):
            logits, emb = model(params, batch.images)
            ce = softmax_ce(logits, batch.labels).mean()
            return ce + 0.003 * center_loss(emb, batch.labels, centers).mean(), emb
        (loss, emb), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        centers = update_centers(centers, emb, batch.labels, alpha=0.5)
        return params, opt_state, centers
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from margin_jax import _checks, collective
from margin_jax.batch import check_labels_in_range, prepare_embeddings

__all__ = ["CenterState", "init_centers", "center_loss", "update_centers"]


class CenterState(NamedTuple):
    """Class centres carried by the caller (a pytree; keep it out of the optimiser).

    Attributes:
      centers: float [C, D], one centre per class.
    """

    centers: jax.Array


def init_centers(num_classes: int, dim: int, *, dtype=jnp.float32) -> CenterState:
    """Centres at the origin, [num_classes, dim].

    The update rule pulls each centre to its class mean at rate α, so zeros are a
    fine start; the first updates of a class move its centre by α·n_j/(1+n_j) of
    the way to the batch mean.

    Args:
      num_classes: C, number of classes (Python int).
      dim: D, embedding dimension (Python int).
      dtype: dtype of the centres (float32 by default).

    Returns:
      `CenterState` with ``centers`` zeros [C, D].

    Example:
      >>> from margin_jax.centers import init_centers
      >>> init_centers(10, 3).centers.shape
      (10, 3)

    References:
      Wen, Zhang, Li, Qiao, A Discriminative Feature Learning Approach for Deep
      Face Recognition, ECCV 2016, https://ydwen.github.io/papers/WenECCV16.pdf

    Differs: Wen et al.'s Caffe layer fills the centres with a filler from the
    prototxt; pass your own `CenterState(centers=...)` for that.
    """
    fn = "init_centers"
    for name, value in (("num_classes", num_classes), ("dim", dim)):
        if not _checks.is_int(value) or value < 1:
            raise ValueError(f"{fn}: `{name}` must be a positive int; got {value!r}.")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{fn}: `dtype` must be a floating dtype; got {dtype}.")
    return CenterState(centers=jnp.zeros((num_classes, dim), dtype=dtype))


def _check(embeddings, labels, state, where, fn: str) -> None:
    if not isinstance(state, CenterState):
        raise TypeError(f"{fn}: `state` must be a CenterState; got {type(state)}.")
    _checks.check_rank(embeddings, 2, "embeddings", fn, "[B, D]")
    _checks.check_floating(embeddings, "embeddings", fn)
    _checks.check_rank(state.centers, 2, "state.centers", fn, "[C, D]")
    _checks.check_floating(state.centers, "state.centers", fn)
    shape, c_shape = tuple(jnp.shape(embeddings)), tuple(jnp.shape(state.centers))
    if shape[1] != c_shape[1]:
        raise ValueError(
            f"{fn}: `embeddings` [B, D] and `state.centers` [C, D] must have the same "
            f"D; got `embeddings` shape {shape} and `state.centers` shape {c_shape}."
        )
    _checks.check_labels(labels, shape[0], fn, ref="embeddings", ref_shape=shape)
    _checks.check_where(where, shape[0], fn, ref="embeddings", ref_shape=shape)
    check_labels_in_range(labels, where, c_shape[0], fn, "state.centers", c_shape)


def center_loss(
    embeddings: ArrayLike,
    labels: ArrayLike,
    state: CenterState,
    *,
    where: ArrayLike | None = None,
) -> jax.Array:
    """Per-example center loss ℓ_i = ½·||x_i - c_{y_i}||².

    The centres are state, so no gradient reaches them (they are stop-gradient);
    the embeddings get x_i - c_{y_i}. Weight it against softmax with λ (Wen et al.
    use λ = 0.003) and reduce with the mean: L = CE + λ·mean_i ℓ_i.

    Args:
      embeddings: float [B, D].
      labels: integer [B] in [0, C) (checked when concrete, for rows with
        ``where`` True; undefined under jit).
      state: `CenterState` with centres [C, D].
      where: optional bool [B]; False rows give exactly 0 and no gradient.

    Returns:
      Per-example loss [B], float32 or wider.

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax.centers import CenterState, center_loss
      >>> state = CenterState(centers=jnp.array([[0.0, 0.0], [1.0, 1.0]]))
      >>> center_loss(jnp.array([[3.0, 4.0], [1.0, 1.0]]), jnp.array([0, 1]),
      ...             state).tolist()
      [12.5, 0.0]

    References:
      Wen, Zhang, Li, Qiao, A Discriminative Feature Learning Approach for Deep
      Face Recognition, ECCV 2016, https://ydwen.github.io/papers/WenECCV16.pdf

    Differs: returns [B] (the Caffe layer returns the batch mean);
    pytorch-metric-learning's CenterLoss makes the centres learnable parameters
    updated by the optimiser instead of by the Δc rule.
    """
    _check(embeddings, labels, state, where, "center_loss")
    return _center_loss_core(embeddings, labels, state, where)


@jax.jit
def _center_loss_core(embeddings, labels, state, where):
    dtype = _checks.compute_dtype(embeddings, state.centers)
    x, valid = prepare_embeddings(embeddings, where, dtype)
    labels = jnp.where(valid, jnp.asarray(labels), 0)
    c = lax.stop_gradient(jnp.asarray(state.centers, dtype))
    diff = x - jnp.take(c, labels, axis=0, mode="clip")
    return jnp.where(valid, 0.5 * jnp.sum(diff * diff, axis=-1), 0.0)


def update_centers(
    state: CenterState,
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: ArrayLike = 0.5,
    where: ArrayLike | None = None,
    axis_name=None,
) -> CenterState:
    """One step of the centre update rule of Wen et al. (no gradient).

    Δc_j = Σ_{i: y_i = j} (c_j - x_i) / (1 + n_j), c_j <- c_j - α·Δc_j, where n_j is
    the number of (valid) rows of class j in the batch. Classes absent from the
    batch do not move.

    Args:
      state: `CenterState` with centres [C, D].
      embeddings: float [B, D] (treated as constants).
      labels: integer [B] in [0, C).
      alpha: α, the centre learning rate (may be traced); Wen et al. use 0.5.
      where: optional bool [B]; False rows do not count.
      axis_name: optional pmap / shard_map axis (`margin_jax.collective`): n_j
        and the sums run over all devices, so every device gets the
        single-device update of the concatenated batch.

    Returns:
      New `CenterState`, centres [C, D] in the centres' dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> from margin_jax.centers import init_centers, update_centers
      >>> x = jnp.array([[2.0, 0.0], [4.0, 0.0]])
      >>> # n_0 = 2: Δc_0 = (0 - 2 + 0 - 4) / 3 = -2, c_0 = 0 - 0.5·(-2) = 1
      >>> update_centers(init_centers(2, 2), x, jnp.array([0, 0])).centers.tolist()
      [[1.0, 0.0], [0.0, 0.0]]

    References:
      Wen, Zhang, Li, Qiao, A Discriminative Feature Learning Approach for Deep
      Face Recognition, ECCV 2016, https://ydwen.github.io/papers/WenECCV16.pdf

    Differs: the rule of the paper and its Caffe layer, not a gradient step on
    the centres as in pytorch-metric-learning's CenterLoss.
    """
    _check(embeddings, labels, state, where, "update_centers")
    return _update_core(state, embeddings, labels, alpha, where, axis_name=axis_name)


@functools.partial(jax.jit, static_argnames=("axis_name",))
def _update_core(state, embeddings, labels, alpha, where, *, axis_name):
    c = state.centers
    dtype = _checks.compute_dtype(embeddings, c)
    x, valid = prepare_embeddings(lax.stop_gradient(embeddings), where, dtype)
    labels = jnp.where(valid, jnp.asarray(labels), 0)
    num_classes = c.shape[0]
    counts = jax.ops.segment_sum(valid.astype(dtype), labels, num_classes)
    sums = jax.ops.segment_sum(x, labels, num_classes)
    counts, sums = collective.psum_no_grad((counts, sums), axis_name)
    c32 = lax.stop_gradient(jnp.asarray(c, dtype))
    delta = (counts[:, None] * c32 - sums) / (1.0 + counts[:, None])
    new = c32 - jnp.asarray(alpha, dtype) * delta
    return CenterState(centers=new.astype(c.dtype))
