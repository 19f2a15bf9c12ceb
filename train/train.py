"""Training loop: pure pmapped step, orbax checkpoints, open-set evaluation.

`train_and_evaluate(config, workdir)` is the whole job; `train.main` only
parses flags. The step is one pure function ``(state, batch) -> (state,
metrics)`` over the `TrainState` pytree, wrapped in ``jax.pmap`` over all local
devices with axis name ``'batch'``: gradients, batch-norm statistics and the
loss statistics (AdaCos scale, CurricularFace t, hard-mining ranks, centre
updates, triplet mining) are reduced over that axis, so the result equals one
device on the global batch. Two-head models (Taha et al.) also give classifier
logits, which the loss reads from `losses_table.LossInputs.logits`.
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
from train import checkpoint, evaluation, input_pipeline, losses_table, models, report

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
    hyper = {k: v for k, v in config.loss.items() if k != "name"}
    spec = losses_table.get_loss(config.loss.name, hyper)
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
    """The train step pmapped over ``devices`` (default: all local devices)."""
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
    if isinstance(x, jax.Array) and len(x.addressable_shards) > 1:
        data = x.addressable_shards[0].data
        return data.reshape(data.shape[1:])
    return x[0]


def unreplicate(tree):
    return jax.tree.map(_first_replica, tree)


class MetricWriter:
    """Appends metrics to DIR/metrics.jsonl (and TensorBoard if available)."""

    def __init__(self, workdir: str, *, resume_step: int, tensorboard: bool):
        self.path = os.path.join(workdir, "metrics.jsonl")
        # Drop records written after the checkpoint we resume from.
        if os.path.exists(self.path):
            with open(self.path) as f:
                keep = [r for r in f if json.loads(r)["step"] <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(keep)
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                pass
            else:
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step":
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _progress(total, initial, enabled):
    import tqdm

    return tqdm.tqdm(
        total=total, initial=initial, disable=not enabled, desc="train", unit="step"
    )


def load_data(config) -> tuple[input_pipeline.Dataset, input_pipeline.Dataset]:
    """(training classes, held-out classes) of the config's data set, in memory."""
    data = input_pipeline.load_dataset(
        config.dataset,
        config.data_dir,
        split=config.split,
        image_key=config.image_key,
        label_key=config.label_key,
    )
    return input_pipeline.open_set_split(data, config.num_train_classes)


def restore_model(config, workdir: str, image_shape=None, *, step: int | None = None):
    """The model trained in ``workdir`` (latest checkpoint, or ``step``), eval mode.

    A Flax NNX module: ``model(images)`` gives the embeddings [B, D] of
    preprocessed images (`input_pipeline.preprocess`), ``model.head.weight`` the
    class centres W [C, D] (re-joined if the head was sharded). Call
    ``model.train()`` to fine-tune it. ``step=0`` without a checkpoint there
    gives the initialisation (the config's seed), which training starts from.

    Args:
      config: the config the run was trained with.
      workdir: the run's directory.
      image_shape: (H, W, C) of the images; default: read from the data set.
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
        image_shape = load_data(config)[0].images.shape[1:]
    sharded = config.get("head", "dense") == "sharded"
    tx, _ = create_optimizer(config)
    _, eval_graphdef, state = create_train_state(
        config,
        tuple(image_shape),
        config.num_train_classes,
        tx,
        num_shards=len(jax.local_devices()) if sharded else None,
    )
    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"), every=1, keep=None
    )
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


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, max_steps: int | None = None
) -> dict:
    """Trains per ``config`` in ``workdir`` (resuming if possible), then evaluates.

    Args:
      config: see train/configs/default.py.
      workdir: checkpoints, metrics.jsonl, eval.json, report.md and plots.
      max_steps: stop after this global step without evaluating (simulates an
        interruption; the schedule still follows config.num_train_steps).

    Returns:
      The evaluation results (as written to eval.json), or {} if stopped early.

    Raises:
      NonFiniteLossError: the loss became NaN/inf (no checkpoint of that state).
      input_pipeline.DatasetNotPreparedError: the data set is not on disk.
      ValueError: a bad config choice (the message lists valid choices).
    """
    validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    train_data, held_out = load_data(config)
    sampler = input_pipeline.BatchSampler(
        train_data.labels,
        batch_size=config.batch_size,
        seed=config.seed,
        sampler=config.sampler,
        images_per_class=config.images_per_class,
    )
    devices = jax.local_devices()
    head = config.get("head", "dense")
    sharded = head == "sharded"
    tx, schedule = create_optimizer(config)
    graphdef, eval_graphdef, state = create_train_state(
        config,
        train_data.images.shape[1:],
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
    if ckpt.latest_step() is not None:
        state = ckpt.restore(state)
    start = int(state.step)
    writer = MetricWriter(workdir, resume_step=start, tensorboard=config.tensorboard)
    p_step = make_p_train_step(
        graphdef, tx, loss_fn, devices, head=head, num_classes=config.num_train_classes
    )
    p_state = to_devices(state, devices, sharded=sharded)

    end = config.num_train_steps if max_steps is None else max_steps
    bar = _progress(config.num_train_steps, start, config.progress_bar)
    tick, ticked_step = time.perf_counter(), start
    try:
        for step in range(start, end):
            # Every process draws the same global batch and reads its own slice.
            indices = input_pipeline.process_slice(
                sampler(step), jax.process_index(), jax.process_count()
            )
            batch = input_pipeline.get_batch(train_data, indices)
            p_state, p_metrics = p_step(
                p_state, input_pipeline.shard(batch, len(devices))
            )
            metrics = jax.device_get(unreplicate(p_metrics))
            done = step + 1
            finite = metrics.pop("params_finite")
            if not (np.isfinite(metrics["loss"]) and finite):
                raise NonFiniteLossError(
                    f"Non-finite loss ({metrics['loss']}) or parameters at step "
                    f"{done}; training "
                    "stopped. The last good checkpoint (step "
                    f"{ckpt.latest_step()}) in {ckpt.directory} is intact; lower "
                    "config.learning_rate or the loss scale and rerun to resume."
                )
            ckpt.save(
                done,
                to_host(p_state, sharded=sharded),
                force=done == config.num_train_steps,
            )
            bar.update(1)
            if done % config.log_every_steps == 0 or done == end:
                now = time.perf_counter()
                metrics["learning_rate"] = schedule(step)
                metrics["images_per_sec"] = (
                    (done - ticked_step) * config.batch_size / (now - tick)
                )
                tick, ticked_step = now, done
                writer.write(done, metrics)
                bar.set_postfix(
                    loss=f"{metrics['loss']:.3f}",
                    acc=f"{metrics['accuracy']:.3f}",
                    img_s=f"{metrics['images_per_sec']:.0f}",
                )
            every = config.get("eval_every_steps", 0)
            if every and done % every == 0 and done < config.num_train_steps:
                results = _evaluate(p_state, eval_graphdef, held_out, config, sharded)
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
    finally:
        bar.close()
        writer.close()
        ckpt.close()
    if end < config.num_train_steps:
        return {}
    results = _evaluate(p_state, eval_graphdef, held_out, config, sharded)
    report.write_report(workdir, results, config)
    return results


def _evaluate(p_state, eval_graphdef, held_out, config, sharded: bool) -> dict:
    """Open-set evaluation of the current pmapped state on held-out classes."""
    state = to_host(p_state, sharded=sharded)
    if sharded:
        state = full_head(state, config.num_train_classes)
    return evaluation.evaluate_open_set(
        eval_graphdef, state.params, state.batch_stats, held_out, config
    )
