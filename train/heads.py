"""The classifier head: its loss, where its W sits in a state, its predictions.

`make_loss_fn` binds the configured loss to the configured head
(``config.head``: dense, chunked or sharded, `train.losses_table.head_loss`).
Every model of `train.models` keeps the class centres W [C, D] at
``model.head.weight``, so W's path in the params state is `HEAD_WEIGHT` from
the root; `head_mask` and `map_head` find W there, and at the same place in the
trees shaped like the params (gradients, optimiser slots), never by a module's
name deeper down (a backbone block called ``head`` is not the classifier).
`top1_predictions` is the closed-set accuracy's argmax over W in class blocks.
"""

from __future__ import annotations

import jax

import margin_jax as mj
from train import losses_table

# model.head.weight of every train.models model, as a path in its params state.
HEAD_WEIGHT = ("head", "weight")


def make_loss_fn(config, num_classes: int | None = None):
    """The configured loss with the configured classifier head (`config.head`)."""
    name, hyper = losses_table.config_loss(config.loss)
    spec = losses_table.get_loss(name, hyper)
    return losses_table.head_loss(
        spec,
        config.get("head", "dense"),
        chunk_size=config.get("head_chunk_size", 0),
        partial_fc_rate=config.get("partial_fc_rate", 1.0),
        num_classes=num_classes,
    )


def _key_name(key):
    """The name or index of one pytree key (DictKey, GetAttrKey, SequenceKey)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return key


def head_mask(params):
    """A tree shaped like ``params``: True on W's leaves, False elsewhere.

    W is the subtree at `HEAD_WEIGHT` from the root of ``params`` (its leaf is
    the Variable's value); a ``head.weight`` deeper in the tree is not W.

    Raises:
      ValueError: ``params`` has nothing at `HEAD_WEIGHT` (not a model's params).
    """
    depth = len(HEAD_WEIGHT)
    mask = jax.tree_util.tree_map_with_path(
        lambda path, _: tuple(map(_key_name, path[:depth])) == HEAD_WEIGHT, params
    )
    if not any(jax.tree.leaves(mask)):
        raise ValueError(
            f"No classifier head in this params tree: nothing at path "
            f"{HEAD_WEIGHT} (model.head.weight)."
        )
    return mask


def map_head(fn, tree, params, other=lambda x: x):
    """``fn`` on W's leaves in ``tree``, ``other`` on every other leaf.

    W is found in each subtree of ``tree`` shaped like ``params`` (the params
    themselves, their gradients, an optimiser's slots such as momentum or
    Adam's mu and nu), at `HEAD_WEIGHT` from that subtree's root: the same
    selection for ``params``, a `TrainState` holding them, or ``grads``.
    ``params`` only gives the structure (any layout: host, pmapped, sharded).
    """
    mask = head_mask(params)
    structure = jax.tree.structure(params)

    def shaped_like_params(x):
        return jax.tree.structure(x) == structure

    def apply(x):
        if not shaped_like_params(x):
            return other(x)
        return jax.tree.map(lambda m, leaf: fn(leaf) if m else other(leaf), mask, x)

    return jax.tree.map(apply, tree, is_leaf=shaped_like_params)


# The closed-set accuracy's argmax over W in class blocks (any head).
top1_predictions = mj.top1_classes
