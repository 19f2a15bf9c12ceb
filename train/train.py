"""Training loop: pure pmapped step, streamed input, orbax checkpoints, evaluation.

`train_and_evaluate(config, workdir)` is the whole job; `train.main` only
parses flags. The step is one pure function ``(state, batch) -> (state,
metrics)`` over the `TrainState` pytree, wrapped in ``jax.pmap`` over all local
devices (all devices of all processes in a multi-host run) with axis name
``'batch'``: gradients, batch-norm statistics and the loss statistics (AdaCos
scale, CurricularFace t, hard-mining ranks, centre updates, triplet mining) are
reduced over that axis, so the result equals one device on the global batch.
Two-head models (Taha et al.) also give classifier logits, which the loss reads
from `losses_table.LossInputs.logits`.

The batches come from the Grain stream of `train.input_pipeline` (each process
reads its slice of every global batch) or, with ``config.synthetic``, are made
on the devices. Evaluation: the open-set metrics on held-out identities
(`train.evaluation`) and the ``config.val_targets`` verification sets
(`train.validation`, best step kept in ``<workdir>/best``). Process 0 writes
metrics.jsonl, TensorBoard and the report; every process takes part in the
checkpoints.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

import margin_jax as mj
from train import (
    checkpoint,
    evaluation,
    input_pipeline,
    losses_table,
    models,
    report,
    validation,
)

AXIS_NAME = "batch"
OPTIMIZERS = ("sgd", "adamw")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the last good checkpoint is left intact."""


class TrainState(NamedTuple):
    """Everything that changes during training (one pytree, checkpointed)."""

    step: jax.Array  # int32 scalar: steps done; also the data position.
    params: Any  # nnx.State of nnx.Param
    batch_stats: Any  # nnx.State of nnx.BatchStat
    opt_state: Any
    loss_state: Any  # the loss's own state (`train.losses_table`)
    rng: jax.Array  # uint32 [2], advanced every step (for stochastic layers)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast on a bad choice, with the list of valid ones."""
    make_loss_fn(config)
    for key, valid in (
        ("optimizer", OPTIMIZERS),
        ("sampler", input_pipeline.SAMPLERS),
        ("model", models.MODELS),
    ):
        if config[key] not in valid:
            raise ValueError(
                f"Unknown {key} {config[key]!r}; valid choices for config.{key}: "
                f"{', '.join(valid)}."
            )
    affine = dict(config.get("random_affine") or {})
    unknown = sorted(set(affine) - {"rotation", "scale", "translation"})
    bad = sorted(k for k, v in affine.items() if not float(v) >= 0)
    if unknown or bad:
        raise ValueError(
            "config.random_affine takes rotation (degrees), scale (fraction) and "
            f"translation (pixels), each >= 0; got {affine}."
        )
    name = config.loss.name
    spec = losses_table.get_loss(name)
    two_head_model = config.model in models.TWO_HEAD_MODELS
    if spec.two_head != two_head_model:
        needs = "needs" if spec.two_head else "cannot use"
        raise ValueError(
            f"Loss {name!r} {needs} a two-head model (classifier + embedding "
            f"head); got config.model={config.model!r}. Two-head models: "
            f"{', '.join(models.TWO_HEAD_MODELS)}; two-head losses: "
            f"{', '.join(k for k, v in losses_table.LOSSES.items() if v.two_head)}."
        )
    if spec.sampler is not None and config.sampler != spec.sampler:
        raise ValueError(
            f"Loss {name!r} needs config.sampler={spec.sampler!r} (P classes x K "
            f"images per batch, see train.input_pipeline.BatchSampler); got "
            f"{config.sampler!r}."
        )
    if spec.sampler == "pk" and config.images_per_class < 2:
        raise ValueError(
            f"Loss {name!r} mines pairs within a class: config.images_per_class "
            f"must be >= 2; got {config.images_per_class}."
        )


def make_loss_fn(config, num_classes: int | None = None):
    """The configured loss with the configured classifier head (`config.head`)."""
    name, hyper = losses_table.config_loss(config.loss)
    spec = losses_table.get_loss(name, hyper)
    return losses_table.head_loss(
        spec,
        config.get("head", "dense"),
        chunk_size=config.get("head_chunk_size", 2048),
        partial_fc_rate=config.get("partial_fc_rate", 1.0),
        num_classes=num_classes,
    )


def _is_head_weight(path) -> bool:
    """True for the classifier head's W (and its optimiser slots) in a state."""
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return any(
        a == "head" and b == "weight" for a, b in zip(names, names[1:], strict=False)
    )


def _map_head(fn, tree, other=lambda x: x):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: fn(x) if _is_head_weight(path) else other(x), tree
    )


def top1_predictions(
    embeddings, weights, *, chunk_size=2048, axis_name=None, num_classes=None
):
    """argmax_j cos(x_i, w_j) [B] in class blocks (never the whole [B, C]).

    With ``axis_name`` (sharded head), ``weights`` is this device's shard and
    the winner is taken over all devices for the whole (all-gathered) batch:
    the result is [B_global], labels are global, and rows with a global index
    >= ``num_classes`` (padding of the last shards) never win.
    """
    x = mj.l2_normalize(embeddings)
    if axis_name is not None:
        x = jax.lax.all_gather(x, axis_name, tiled=True)
    num_rows = weights.shape[0]
    chunk = min(chunk_size, num_rows)
    offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * num_rows
    limit = offset + num_rows if num_classes is None else num_classes

    def body(k, carry):
        best, arg = carry
        start = jnp.minimum(k * chunk, num_rows - chunk)
        block = jax.lax.dynamic_slice_in_dim(weights, start, chunk)
        cos = x @ mj.l2_normalize(block).T
        rows = offset + start + jnp.arange(chunk)
        cos = jnp.where(rows < limit, cos, -jnp.inf)
        block_best = jnp.max(cos, axis=-1)
        better = block_best > best
        return (
            jnp.where(better, block_best, best),
            jnp.where(better, start + jnp.argmax(cos, axis=-1), arg),
        )

    init = (jnp.full(x.shape[:1], -jnp.inf, x.dtype), jnp.zeros(x.shape[:1], jnp.int32))
    best, arg = jax.lax.fori_loop(0, -(-num_rows // chunk), body, init)
    if axis_name is None:
        return arg
    arg = arg + offset
    bests = jax.lax.all_gather(best, axis_name)
    args = jax.lax.all_gather(arg, axis_name)
    winner = jnp.argmax(bests, axis=0)
    return jnp.take_along_axis(args, winner[None], axis=0)[0]


def create_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """optax optimiser with linear warm-up then cosine decay."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=max(config.num_train_steps, config.warmup_steps + 1),
        end_value=config.learning_rate * config.end_lr_factor,
    )
    if config.optimizer == "sgd":
        tx = optax.chain(
            optax.add_decayed_weights(config.weight_decay),
            optax.sgd(schedule, momentum=config.momentum, nesterov=True),
        )
    else:
        tx = optax.adamw(schedule, weight_decay=config.weight_decay)
    return tx, schedule


def train_step(
    state: TrainState,
    batch: dict,
    *,
    graphdef,
    tx: optax.GradientTransformation,
    loss_fn,
    axis_name: str | None,
    head: str = "dense",
    num_classes: int | None = None,
) -> tuple[TrainState, dict]:
    """One optimiser step on this device's shard; collectives over axis_name.

    With the sharded head, W is this device's class shard: the objective is
    this device's share of the global mean (sum / global batch), the backbone's
    gradients are summed over devices and W's stay on their own device.
    """
    images, labels = batch["image"], batch["label"]
    if images.dtype == jnp.uint8:  # the input stream's images, mapped on device
        images = input_pipeline.preprocess(images)
    chex.assert_rank(images, 4)
    chex.assert_rank(labels, 1)
    chex.assert_equal_shape_prefix([images, labels], 1)
    chex.assert_type(labels, jnp.int32)
    rng, step_rng = jax.random.split(state.rng)
    pmean = functools.partial(jax.lax.pmean, axis_name=axis_name)
    psum = functools.partial(jax.lax.psum, axis_name=axis_name)
    if axis_name is None:
        pmean = psum = lambda x: x  # noqa: E731
    sharded = head == "sharded"
    devices = jax.lax.axis_size(axis_name) if axis_name is not None else 1

    def objective(params, batch_stats):
        model = nnx.merge(graphdef, params, batch_stats, copy=True)
        # logits: the classifier head of a two-head model, else None.
        embeddings, logits = models.embed_and_classify(model, images)
        weights = model.head.weight[...]
        chex.assert_rank(embeddings, 2)
        chex.assert_equal_shape_prefix([embeddings, labels], 1)
        inputs = losses_table.LossInputs(embeddings, weights, labels, logits)
        per_example, loss_state = loss_fn(
            inputs,
            state.loss_state,
            step=state.step,
            axis_name=axis_name,
            rng=step_rng,
        )
        chex.assert_shape(per_example, labels.shape)
        if logits is not None:
            predictions = jnp.argmax(jax.lax.stop_gradient(logits), axis=-1)
        else:
            predictions = top1_predictions(
                jax.lax.stop_gradient(embeddings),
                jax.lax.stop_gradient(weights),
                axis_name=axis_name if sharded else None,
                num_classes=num_classes,
            )
        if sharded:  # predictions of the global batch; keep this device's rows
            predictions = jax.lax.dynamic_slice_in_dim(
                predictions,
                jax.lax.axis_index(axis_name) * labels.shape[0],
                labels.shape[0],
            )
        accuracy = jnp.mean(predictions == labels)
        aux = (nnx.state(model, nnx.BatchStat), loss_state, accuracy)
        if sharded:
            objective_value = jnp.sum(per_example) / (labels.shape[0] * devices)
            return objective_value, aux
        return jnp.mean(per_example), aux

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    (loss, (batch_stats, loss_state, accuracy)), grads = grad_fn(
        state.params, state.batch_stats
    )
    if sharded:
        # The all-gathers inside the sharded loss already sent every device's
        # share of dL/dx back: sum the backbone's parts; W's shard is local.
        grads = _map_head(lambda g: g, grads, psum)
        loss = psum(loss)
    else:
        # Equal shards per device: the mean of the shard means is the global mean.
        grads = pmean(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        loss_state=loss_state,
        rng=rng,
    )
    metrics = {
        "loss": pmean(loss),
        "accuracy": pmean(accuracy),
        "grad_norm": optax.tree.norm(grads),
        # Checked on the host before the new state may be checkpointed.
        "params_finite": jnp.all(
            jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)])
        ),
    }
    for path, leaf in jax.tree_util.tree_flatten_with_path(loss_state)[0]:
        if jnp.ndim(leaf) == 0:
            metrics["loss_state" + jax.tree_util.keystr(path)] = leaf
    return new_state, metrics


def make_p_train_step(
    graphdef, tx, loss_fn, devices=None, head="dense", num_classes=None
):
    """The train step pmapped over ``devices``.

    None: pmap's default, every device of every process (multi-host runs).
    """
    step = functools.partial(
        train_step,
        graphdef=graphdef,
        tx=tx,
        loss_fn=loss_fn,
        axis_name=AXIS_NAME,
        head=head,
        num_classes=num_classes,
    )
    return jax.pmap(step, axis_name=AXIS_NAME, devices=devices, donate_argnums=(0,))


def create_train_state(config, image_shape, num_classes, tx, *, num_shards=None):
    """(train graphdef, eval graphdef, initial TrainState in host layout).

    With ``num_shards`` (the sharded head), W [C, D] is initialised exactly as
    for the dense head, padded to ``num_shards · ⌈C / num_shards⌉`` rows and split
    by class: the head's leaves (W and its optimiser slots) then carry a leading
    device axis [num_shards, C_d, D]; everything else is one copy.
    """
    model = models.create_model(
        config, image_shape, num_classes, axis_name=AXIS_NAME, seed=config.seed
    )
    model.train()
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    model.eval()
    eval_graphdef, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
    shards = None
    if num_shards:
        rows = -(-num_classes // num_shards)

        def split(w):
            padded = jnp.zeros((num_shards * rows, w.shape[1]), w.dtype)
            return padded.at[:num_classes].set(w).reshape(num_shards, rows, -1)

        shards = _map_head(split, params)
        params = _map_head(lambda w: w[0], shards)  # one shard's shape for tx.init
    loss_spec = losses_table.get_loss(config.loss.name)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        loss_state=loss_spec.init_state(num_classes, config.embedding_dim),
        rng=jax.random.PRNGKey(config.seed),
    )
    if num_shards:
        stack = lambda x: jnp.broadcast_to(x, (num_shards, *x.shape))  # noqa: E731
        state = state._replace(
            params=shards, opt_state=_map_head(stack, state.opt_state)
        )
    return graphdef, eval_graphdef, state


def device_sharding(devices) -> jax.sharding.NamedSharding:
    """The placement of the pmapped step's outputs: leading axis over ``devices``.

    Inputs placed like this hit the step's compilation cache from the first
    call; host (NumPy) inputs would compile the step a second time once its
    own outputs come back (about 1.5 s per training run on CPU).
    """
    mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS_NAME,))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS_NAME))


def to_devices(state, devices, *, sharded=False):
    """Host layout -> pmap layout: replicate, except a sharded head's leaves."""
    if not sharded:
        return replicate(state, devices)
    placed = functools.partial(jax.device_put, device=device_sharding(devices))
    return _map_head(
        lambda x: placed(np.asarray(x)), state, lambda x: replicate(x, devices)
    )


def to_host(p_state, *, sharded=False):
    """pmap layout -> host layout (what is checkpointed and evaluated)."""
    if not sharded:
        return unreplicate(p_state)
    # The head's shards come to the host as one [devices, C_d, D] array.
    return _map_head(lambda x: np.asarray(jax.device_get(x)), p_state, _first_replica)


def full_head(state, num_classes):
    """The host-layout state with a sharded W re-joined to [C, D] (for eval)."""
    params = _map_head(lambda w: w.reshape(-1, w.shape[-1])[:num_classes], state.params)
    return state._replace(params=params)


def replicate(tree, devices):
    """A copy of ``tree`` per device, stacked on a new leading axis for pmap.

    Placed with `device_sharding`, as the pmapped step returns its state.
    """
    n, sharding = len(devices), device_sharding(devices)
    return jax.tree.map(
        lambda x: jax.device_put(
            np.broadcast_to(np.asarray(x), (n, *np.shape(x))), sharding
        ),
        tree,
    )


def _first_replica(x):
    """Device 0's copy of a pmapped array, without a multi-device computation.

    ``x[0]`` on an array spread over the devices compiles a gather over all of
    them; run while the next pmapped step is in flight, such programs can wait
    on each other's rendezvous and hang XLA:CPU. Reading device 0's buffer
    involves no other device.
    """
    if isinstance(x, jax.Array) and (
        len(x.addressable_shards) > 1 or not x.is_fully_addressable
    ):
        data = x.addressable_shards[0].data
        return data.reshape(data.shape[1:])
    return x[0]


def unreplicate(tree):
    return jax.tree.map(_first_replica, tree)


class MetricWriter:
    """Appends metrics to DIR/metrics.jsonl (and TensorBoard if available).

    On resume the records after the checkpoint are dropped (they are redone),
    so the log holds every step once. ``records`` are the records kept. Only
    the writing process (process 0 of a multi-host run) touches the files.
    """

    def __init__(
        self, workdir: str, *, resume_step: int, tensorboard: bool, write: bool = True
    ):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.write_files = write
        self.records = []
        lines = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                lines = [r for r in f if json.loads(r)["step"] <= resume_step]
            self.records = [json.loads(r) for r in lines]
        # Every process has read the file before process 0 rewrites it.
        _sync_processes("margin_jax_metrics_read")
        if write and lines:
            with open(self.path, "w") as f:
                f.writelines(lines)
        self._tb = None
        if tensorboard and write:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                pass
            else:
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.records.append(record)
        if not self.write_files:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step":
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _sync_processes(name: str) -> None:
    """A barrier over the processes of a multi-host run (none with one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _progress(total, initial, enabled):
    import tqdm

    return tqdm.tqdm(
        total=total, initial=initial, disable=not enabled, desc="train", unit="step"
    )


def open_data(config):
    """(train subset, held-out subset or None) of the config's data set.

    Labels only: the images are read by the input stream (or `Subset.read`).
    """
    records, labels = input_pipeline.open_source(
        config.dataset,
        config.data_dir,
        split=config.split,
        image_key=config.image_key,
        label_key=config.label_key,
    )
    # Every class may train when the run is judged on verification sets.
    rows, remap, held = input_pipeline.open_set_split(
        labels, config.num_train_classes, allow_all=bool(config.val_targets)
    )
    train = input_pipeline.Subset(records, rows, remap)
    held_out = input_pipeline.Subset(records, held, labels[held]) if len(held) else None
    return train, held_out


def load_data(config) -> tuple[input_pipeline.Dataset, input_pipeline.Dataset | None]:
    """(training classes, held-out classes) with their images in memory.

    For small sets (figures, notebooks); training streams instead.
    """
    train, held_out = open_data(config)
    return train.load(), held_out.load() if held_out is not None else None


def image_shape_of(config) -> tuple[int, int, int]:
    """(H, W, C) of the model's input: the data set's, or the synthetic one's."""
    if config.synthetic:
        return tuple(config.synthetic_image_shape)
    return open_data(config)[0].image_shape


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
    validate_config(config)
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"restore_model: no run directory {workdir!r}.")
    if image_shape is None:
        image_shape = image_shape_of(config)
    sharded = config.head == "sharded"
    tx, _ = create_optimizer(config)
    _, eval_graphdef, state = create_train_state(
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
        state = full_head(state, config.num_train_classes)
    return nnx.merge(eval_graphdef, state.params, state.batch_stats)


def synthetic_batches(config, image_shape, devices, start: int, stop: int):
    """Random uint8 images and labels made on the devices, one batch a step.

    ``config.synthetic``: the model, loss and step are the real ones and no
    data set is read, so the throughput is the devices' alone.
    """
    per_device = config.batch_size // (len(devices) * jax.process_count())

    def make(key):
        images_key, labels_key = jax.random.split(key)
        images = jax.random.randint(images_key, (per_device, *image_shape), 0, 256)
        labels = jax.random.randint(
            labels_key, (per_device,), 0, config.num_train_classes
        )
        return {"image": images.astype(jnp.uint8), "label": labels.astype(jnp.int32)}

    p_make = jax.pmap(make, devices=_pmap_devices(devices))
    base = jax.random.fold_in(jax.random.PRNGKey(config.seed), jax.process_index())
    for step in range(start, stop):
        yield p_make(jax.random.split(jax.random.fold_in(base, step), len(devices)))


def _pmap_devices(devices):
    """pmap's devices: these local ones, or all when several processes run."""
    return devices if jax.process_count() == 1 else None


def _check_batch(config, devices) -> None:
    total = len(devices) * jax.process_count()
    if config.batch_size % total:
        raise ValueError(
            f"config.batch_size {config.batch_size} is not divisible by the "
            f"{total} devices ({jax.process_count()} processes x {len(devices)} "
            "local devices); the global batch is split evenly over them."
        )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, max_steps: int | None = None
) -> dict:
    """Trains per ``config`` in ``workdir`` (resuming if possible), then evaluates.

    Args:
      config: see train/configs/default.py.
      workdir: checkpoints, metrics.jsonl, eval.json, report.md and plots
        (with config.val_targets also best/, the best verification step). A
        multi-host run needs one workdir that every process sees.
      max_steps: stop after this global step without evaluating (simulates an
        interruption; the schedule still follows config.num_train_steps).

    Returns:
      The evaluation results (as written to eval.json), or {} if stopped early.

    Raises:
      NonFiniteLossError: the loss became NaN/inf (no checkpoint of that state).
      input_pipeline.DatasetNotPreparedError: the data set is not on disk.
      validation.TargetNotFoundError: a config.val_targets file does not exist.
      ValueError: a bad config choice (the message lists valid choices).
    """
    validate_config(config)
    devices = jax.local_devices()
    _check_batch(config, devices)
    head = config.head
    sharded = head == "sharded"
    if sharded and jax.process_count() > 1:
        raise ValueError(
            "config.head='sharded' splits W over one process's devices; a "
            "multi-host run uses head='dense' or 'chunked'."
        )
    writes = jax.process_index() == 0
    validation.check_files(config.val_targets)  # before any data is prepared
    os.makedirs(workdir, exist_ok=True)
    if config.synthetic:
        train_data, held_out = None, None
        image_shape = tuple(config.synthetic_image_shape)
    else:
        train_data, held_out = open_data(config)
        image_shape = train_data.image_shape
    targets = validation.VerificationTargets(config.val_targets, image_shape)
    if held_out is None and not targets and not config.synthetic:
        raise ValueError(
            "Nothing to evaluate: no identity is held out "
            f"(config.num_train_classes={config.num_train_classes}) and "
            "config.val_targets is empty. Hold classes out or give "
            "verification sets (.bin files)."
        )
    tx, schedule = create_optimizer(config)
    graphdef, eval_graphdef, state = create_train_state(
        config,
        image_shape,
        config.num_train_classes,
        tx,
        num_shards=len(devices) if sharded else None,
    )
    loss_fn = make_loss_fn(config, num_classes=config.num_train_classes)

    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        every=config.checkpoint_every_steps,
        keep=config.keep_checkpoints,
    )
    initial = state  # the untrained baseline of the report
    writer = batches = bar = None
    try:
        if ckpt.latest_step() is not None:
            state = ckpt.restore(state)
        start = int(state.step)
        writer = MetricWriter(
            workdir, resume_step=start, tensorboard=config.tensorboard, write=writes
        )
        best = validation.BestTracker(workdir, writer.records, targets.names)
        p_step = make_p_train_step(
            graphdef,
            tx,
            loss_fn,
            _pmap_devices(devices),
            head=head,
            num_classes=config.num_train_classes,
        )
        p_state = to_devices(state, devices, sharded=sharded)
        end = config.num_train_steps if max_steps is None else max_steps
        batches = _batches(config, train_data, image_shape, devices, start, end)
        evaluator = _Evaluator(
            eval_graphdef, config, sharded=sharded, channels=image_shape[-1]
        )
        bar = _progress(config.num_train_steps, start, config.progress_bar and writes)
        clock = _Clock(start, config.num_train_steps)

        def validate(done, host):
            """Scores the targets; best/ is saved before the record is written."""
            # Process 0's numbers for every process: one decision about best/.
            results = _from_process_0(evaluator.targets(host, targets))
            record, improved = best.update(done, results)
            if improved:
                best.save(done, host, results, write=writes)
            writer.write(done, record)
            bar.write(
                f"step {done}: "
                + ", ".join(f"{n} {v['accuracy']:.4f}" for n, v in results.items())
            )

        for step in range(start, end):
            p_state, p_metrics = p_step(p_state, next(batches))
            done = step + 1
            # Checked every step, before the state may be saved. The stream's
            # workers and prefetch thread read the next batches meanwhile.
            metrics = jax.device_get(unreplicate(p_metrics))
            finite = metrics.pop("params_finite")
            if not (np.isfinite(metrics["loss"]) and finite):
                raise NonFiniteLossError(
                    f"Non-finite loss ({metrics['loss']}) or parameters at step "
                    f"{done}; training stopped. The last good checkpoint (step "
                    f"{ckpt.latest_step()}) in {ckpt.directory} is intact; lower "
                    "config.learning_rate or the loss scale and rerun to resume."
                )
            bar.update(done - bar.n)
            if done % config.log_every_steps == 0 or done == end:
                metrics["learning_rate"] = schedule(step)
                metrics.update(clock.tick(done, config.batch_size))
                writer.write(done, metrics)
                bar.set_postfix(
                    loss=f"{metrics['loss']:.3f}",
                    acc=f"{metrics['accuracy']:.3f}",
                    img_s=f"{metrics['images_per_sec']:.0f}",
                    eta=_duration(metrics["eta_seconds"]),
                )
            last = done == config.num_train_steps
            # Evaluations before the checkpoint of the same step: a run killed
            # during one resumes before that step and redoes it.
            val_due = targets and (last or _due(done, config.val_every_steps))
            eval_due = (
                held_out is not None
                and not last
                and _due(done, config.eval_every_steps)
            )
            save_due = last or ckpt.due(done)
            if not (val_due or eval_due or save_due):
                continue
            host = to_host(p_state, sharded=sharded)  # one copy for all three
            if val_due:
                validate(done, host)
            if eval_due:
                _log_open_set(done, evaluator.open_set(host, held_out), writer, bar)
            if save_due:
                ckpt.save(done, host, force=last)
        if end < config.num_train_steps:
            return {}
        finished = {r["step"] for r in writer.records if "val/mean_accuracy" in r}
        if targets and config.num_train_steps not in finished:
            # e.g. targets added to a finished run
            validate(config.num_train_steps, to_host(p_state, sharded=sharded))
    finally:
        if batches is not None and hasattr(batches, "close"):
            batches.close()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        ckpt.close()
    host = to_host(p_state, sharded=sharded)
    results = {}
    if held_out is not None:
        results = evaluator.open_set(host, held_out)
        results["baselines"] = evaluator.baselines(initial, held_out)
    if targets:
        record = [
            r
            for r in writer.records
            if "val/mean_accuracy" in r and r["step"] == config.num_train_steps
        ][-1]
        results["val_targets"] = {
            name: {
                key: record[f"val/{name}/{key}"]
                for key in ("accuracy", "accuracy_std", "xnorm", "best")
            }
            for name in targets.names
        }
        results["val_mean_accuracy"] = record["val/mean_accuracy"]
        results["best_step"] = best.best_step
    if writes:
        report.write_report(workdir, results, config)
    return results


def _due(step: int, every: int) -> bool:
    return bool(every) and step % every == 0


def _batches(config, train_data, image_shape, devices, start: int, end: int):
    """The batches of steps start .. end - 1, sharded over the local devices."""
    if end <= start:  # resumed at (or past) the last step: nothing to read
        return iter(())
    if config.synthetic:
        return synthetic_batches(config, image_shape, devices, start, end)
    sampler = input_pipeline.BatchSampler(
        train_data.labels,
        batch_size=config.batch_size,
        seed=config.seed,
        sampler=config.sampler,
        images_per_class=config.images_per_class,
    )
    read = input_pipeline.ReadBatch(
        train_data,
        sampler,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        random_flip=config.random_flip,
        random_affine=config.get("random_affine"),
    )
    stream = input_pipeline.train_batches(read, start, end, workers=config.data_workers)
    return _ShardedStream(stream, len(devices))


class _ShardedStream:
    """The stream's per-process batches reshaped to [devices, b / devices, ...]."""

    def __init__(self, stream, num_devices: int):
        self.stream, self.num_devices = stream, num_devices

    def __next__(self):
        return input_pipeline.shard(next(self.stream), self.num_devices)

    def close(self):
        self.stream.close()


class _Clock:
    """images/s of the last log window; ETA from the mean step time so far.

    The first window holds the compilation (and the workers' start), so the
    ETA uses the steps after it once there are any.
    """

    def __init__(self, start: int, total: int):
        self.total = total
        self.tick_time, self.tick_step = time.perf_counter(), start
        self.first = None  # (time, step) at the end of the first window

    def tick(self, done: int, batch_size: int) -> dict:
        now = time.perf_counter()
        window = (now - self.tick_time) / max(done - self.tick_step, 1)
        if self.first is None:
            self.first = (now, done)
            per_step = window
        elif done > self.first[1]:
            per_step = (now - self.first[0]) / (done - self.first[1])
        else:
            per_step = window
        self.tick_time, self.tick_step = now, done
        return {
            "images_per_sec": batch_size / window,
            "eta_seconds": (self.total - done) * per_step,
        }


def _log_open_set(done: int, results: dict, writer, bar) -> None:
    scalars = {
        f"eval_{k}": v
        for k, v in results.items()
        if isinstance(v, float) and not k.startswith("_")
    }
    scalars["eval_recall_at_1"] = results["recall_at_k"]["recall@1"]
    writer.write(done, scalars)
    bar.write(
        f"step {done}: held-out verification "
        f"{results['verification_accuracy']:.4f}, "
        f"Recall@1 {scalars['eval_recall_at_1']:.4f}"
    )


def _from_process_0(results: dict) -> dict:
    """Process 0's copy of a {name: {key: float}} dict on every process."""
    if jax.process_count() == 1:
        return results
    from jax.experimental import multihost_utils

    names = sorted(results)
    keys = sorted(results[names[0]])
    values = np.array([[results[n][k] for k in keys] for n in names], np.float64)
    # As raw bits: without jax_enable_x64 a float64 array would travel as float32.
    bits = multihost_utils.broadcast_one_to_all(values.view(np.uint32))
    values = np.asarray(bits).view(np.float64)
    return {
        n: {k: float(values[i, j]) for j, k in enumerate(keys)}
        for i, n in enumerate(names)
    }


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class _Evaluator:
    """Evaluates host-layout states: open set on held-out classes, `.bin` sets."""

    def __init__(self, eval_graphdef, config, *, sharded: bool, channels: int):
        self.eval_graphdef = eval_graphdef
        self.config = config
        self.sharded = sharded
        self.channels = channels

    def _placed(self, state):
        if self.sharded:
            state = full_head(state, self.config.num_train_classes)
        return jax.device_put((state.params, state.batch_stats))

    def open_set(self, state, held_out) -> dict:
        params, batch_stats = self._placed(state)
        return evaluation.evaluate_open_set(
            self.eval_graphdef, params, batch_stats, held_out, self.config
        )

    def baselines(self, initial_state, held_out) -> dict:
        """Raw pixels and the network at initialisation, on the same pairs."""
        params, batch_stats = self._placed(initial_state)
        return evaluation.evaluate_baselines(
            self.eval_graphdef, params, batch_stats, held_out, self.config
        )

    def targets(self, state, targets: validation.VerificationTargets) -> dict:
        params, batch_stats = self._placed(state)

        def embed_fn(images):  # uint8 RGB from a .bin
            x = validation.as_model_input(np.asarray(images), self.channels)
            return evaluation.embed(
                self.eval_graphdef, params, batch_stats, x, batch_size=len(x)
            )

        return targets.evaluate(embed_fn)
