"""A trained model back from its run directory: `restore_model` (eval mode).

The model is rebuilt as `train.train` builds it for training (same config, same
initialisation), then the checkpoint is read into that state. `train.train`
re-exports `restore_model` and is imported here on use, so either module can be
imported first.
"""

from __future__ import annotations

import os

import jax
from flax import nnx

from train import checkpoint, parallel, validation


def image_shape_of(config) -> tuple[int, int, int]:
    """(H, W, C) of the model's input: the data set's, or the synthetic one's."""
    from train import train as train_lib

    if config.synthetic:
        return tuple(config.synthetic_image_shape)
    return train_lib.open_data(config)[0].image_shape


def restore_model(config, workdir: str, image_shape=None, *, step: int | None = None):
    """The model trained in ``workdir`` (latest checkpoint, or ``step``), eval mode.

    A Flax NNX module: ``model(images)`` gives the embeddings [B, D] of
    preprocessed images (`input_pipeline.preprocess`), ``model.head.weight`` the
    class centres W [C, D] (re-joined if the head was sharded). Call
    ``model.train()`` to fine-tune it. ``step=0`` without a checkpoint there
    gives the initialisation (the config's seed), which training starts from.

    Args:
      config: the config the run was trained with.
      workdir: the run's directory; ``workdir/best`` restores the best
        verification step of a run with ``config.val_targets``.
      image_shape: (H, W, C) of the images; default: the data set's.
      step: a saved step, 0, or None for the latest.

    Raises:
      FileNotFoundError: ``workdir`` does not exist, or has no checkpoint (or
        none at ``step``).
      ValueError: a sharded head saved with another device count.
    """
    from train import train as train_lib

    train_lib.validate_config(config)
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"restore_model: no run directory {workdir!r}.")
    if image_shape is None:
        image_shape = image_shape_of(config)
    sharded = config.head == "sharded"
    tx, _ = train_lib.create_optimizer(config)
    _, eval_graphdef, state = train_lib.create_train_state(
        config,
        tuple(image_shape),
        config.num_train_classes,
        tx,
        num_shards=len(jax.local_devices()) if sharded else None,
    )
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory) and os.path.isfile(
        os.path.join(workdir, validation.BEST_JSON)
    ):
        directory = workdir  # <run>/best: the best verification step
    ckpt = checkpoint.Checkpointer(directory, every=1, keep=None)
    try:
        steps = ckpt.all_steps()
        if step == 0 and 0 not in steps:
            pass  # the initial state
        elif (step is None and not steps) or (step is not None and step not in steps):
            raise FileNotFoundError(
                f"No checkpoint{'' if step is None else f' at step {step}'} in "
                f"{ckpt.directory} (saved steps: {steps}); train there first "
                "(train_and_evaluate(config, workdir))."
            )
        elif not sharded:
            state = ckpt.restore(state, step=step)
        else:
            try:
                state = ckpt.restore(state, step=step)
            except ValueError as e:
                raise ValueError(
                    f"restore_model: the sharded head in {ckpt.directory} does not "
                    f"fit {len(jax.local_devices())} local devices (W split into "
                    "one shard per device); restore it on the device count it "
                    f"was trained on. ({e})"
                ) from e
    finally:
        ckpt.close()
    if sharded:
        state = parallel.full_head(state, config.num_train_classes)
    return nnx.merge(eval_graphdef, state.params, state.batch_stats)
