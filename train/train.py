"""Training loop: pure pmapped step, orbax checkpoints, open-set evaluation.

`train_and_evaluate(config, workdir)` is the whole job; `train.main` only
parses flags. The step is one pure function ``(state, batch) -> (state,
metrics)`` over the `TrainState` pytree, wrapped in ``jax.pmap`` over all local
devices with axis name ``'batch'``: gradients, batch-norm statistics and the
loss statistics (AdaCos scale, CurricularFace t, hard-mining ranks) are
reduced over that axis, so the result equals one device on the global batch.
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
    loss = dict(config.loss)
    losses_table.get_loss(loss.pop("name"), loss)
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
) -> tuple[TrainState, dict]:
    """One optimiser step on this device's shard; collectives over axis_name."""
    images, labels = batch["image"], batch["label"]
    chex.assert_rank(images, 4)
    chex.assert_rank(labels, 1)
    chex.assert_equal_shape_prefix([images, labels], 1)
    chex.assert_type(labels, jnp.int32)
    rng, _ = jax.random.split(state.rng)
    pmean = functools.partial(jax.lax.pmean, axis_name=axis_name)
    if axis_name is None:
        pmean = lambda x: x  # noqa: E731

    def objective(params, batch_stats):
        model = nnx.merge(graphdef, params, batch_stats, copy=True)
        embeddings = model(images)
        weights = model.head.weight[...]
        chex.assert_rank(embeddings, 2)
        chex.assert_equal_shape_prefix([embeddings, labels], 1)
        inputs = losses_table.LossInputs(embeddings, weights, labels)
        per_example, loss_state = loss_fn(
            inputs, state.loss_state, step=state.step, axis_name=axis_name
        )
        chex.assert_shape(per_example, labels.shape)
        cos = mj.cosine_logits(
            jax.lax.stop_gradient(embeddings), jax.lax.stop_gradient(weights)
        )
        accuracy = jnp.mean(jnp.argmax(cos, axis=-1) == labels)
        aux = (nnx.state(model, nnx.BatchStat), loss_state, accuracy)
        return jnp.mean(per_example), aux

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    (loss, (batch_stats, loss_state, accuracy)), grads = grad_fn(
        state.params, state.batch_stats
    )
    # Equal shards per device, so the mean of the shard means is the global mean.
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


def make_p_train_step(graphdef, tx, loss_fn, devices=None):
    """The train step pmapped over ``devices`` (default: all local devices)."""
    step = functools.partial(
        train_step, graphdef=graphdef, tx=tx, loss_fn=loss_fn, axis_name=AXIS_NAME
    )
    return jax.pmap(step, axis_name=AXIS_NAME, devices=devices, donate_argnums=(0,))


def create_train_state(config, image_shape, num_classes, tx):
    """(train graphdef, eval graphdef, initial unreplicated TrainState)."""
    model = models.create_model(
        config, image_shape, num_classes, axis_name=AXIS_NAME, seed=config.seed
    )
    model.train()
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    model.eval()
    eval_graphdef, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
    loss_spec = losses_table.get_loss(config.loss.name)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        loss_state=loss_spec.init_state(num_classes),
        rng=jax.random.PRNGKey(config.seed),
    )
    return graphdef, eval_graphdef, state


def replicate(tree, devices):
    """A copy of ``tree`` per device, stacked on a new leading axis for pmap."""
    n = len(devices)
    return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n, *x.shape)), tree)


def unreplicate(tree):
    return jax.tree.map(lambda x: x[0], tree)


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
    data = input_pipeline.load_dataset(
        config.dataset,
        config.data_dir,
        split=config.split,
        image_key=config.image_key,
        label_key=config.label_key,
    )
    train_data, held_out = input_pipeline.open_set_split(data, config.num_train_classes)
    sampler = input_pipeline.BatchSampler(
        train_data.labels,
        batch_size=config.batch_size,
        seed=config.seed,
        sampler=config.sampler,
        images_per_class=config.images_per_class,
    )
    devices = jax.local_devices()
    tx, schedule = create_optimizer(config)
    graphdef, eval_graphdef, state = create_train_state(
        config, train_data.images.shape[1:], config.num_train_classes, tx
    )
    hyper = {k: v for k, v in config.loss.items() if k != "name"}
    loss_fn = losses_table.get_loss(config.loss.name, hyper).fn

    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        every=config.checkpoint_every_steps,
        keep=config.keep_checkpoints,
    )
    if ckpt.latest_step() is not None:
        state = ckpt.restore(state)
    start = int(state.step)
    writer = MetricWriter(workdir, resume_step=start, tensorboard=config.tensorboard)
    p_step = make_p_train_step(graphdef, tx, loss_fn, devices)
    p_state = replicate(state, devices)

    end = config.num_train_steps if max_steps is None else max_steps
    bar = _progress(config.num_train_steps, start, config.progress_bar)
    tick, ticked_step = time.perf_counter(), start
    try:
        for step in range(start, end):
            batch = input_pipeline.get_batch(train_data, sampler(step))
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
                unreplicate(p_state),
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
    finally:
        bar.close()
        writer.close()
        ckpt.close()
    if end < config.num_train_steps:
        return {}
    state = unreplicate(p_state)
    results = evaluation.evaluate_open_set(
        eval_graphdef, state.params, state.batch_stats, held_out, config
    )
    report.write_report(workdir, results, config)
    return results
