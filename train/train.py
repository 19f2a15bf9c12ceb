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

The pieces live in the modules named by what they hold: the classifier head
(its loss, W's place in a state, the top-1 predictions) in `train.heads`, the
host <-> device layouts in `train.parallel`, the log in `train.metrics`, a
trained model back from its workdir in `train.restore`. Their public names are
re-exported here, so ``train.train.restore_model`` and the like keep working.
"""

from __future__ import annotations

import functools
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
    heads,
    input_pipeline,
    losses_table,
    models,
    parallel,
    report,
    validation,
)

# Moved to the modules named by what they hold; still reachable as train.train.X.
from train.heads import make_loss_fn as make_loss_fn
from train.heads import top1_predictions as top1_predictions
from train.metrics import MetricWriter as MetricWriter
from train.parallel import AXIS_NAME as AXIS_NAME
from train.parallel import device_sharding as device_sharding
from train.parallel import full_head as full_head
from train.parallel import replicate as replicate
from train.parallel import synthetic_batches as synthetic_batches
from train.parallel import to_devices as to_devices
from train.parallel import to_host as to_host
from train.parallel import unreplicate as unreplicate
from train.restore import image_shape_of as image_shape_of
from train.restore import restore_model as restore_model

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
    heads.make_loss_fn(config)
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

    The gradient rule of `margin_jax.collective`: the objective is the global
    mean of the per-example losses (`margin_jax.collective.global_mean`; a
    loss over the whole batch, such as the two-head triplet, gives that scalar
    itself), equal on every device, whose gradient on each device is that
    device's share; so the gradients of replicated parameters are summed over
    the devices. With the sharded head, W is this device's class shard: its
    gradient is already complete on its own device and is not summed.
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
        if jnp.ndim(per_example):
            chex.assert_shape(per_example, labels.shape)
        if logits is not None:
            predictions = jnp.argmax(jax.lax.stop_gradient(logits), axis=-1)
        else:
            predictions = heads.top1_predictions(
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
        if jnp.ndim(per_example) == 0:  # already the loss of the global batch
            return per_example, aux
        return mj.collective.global_mean(per_example, axis_name=axis_name), aux

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    (loss, (batch_stats, loss_state, accuracy)), grads = grad_fn(
        state.params, state.batch_stats
    )
    if sharded:  # W's shard is this device's own; the rest is replicated
        grads = heads.map_head(lambda g: g, grads, state.params, psum)
    else:
        grads = psum(grads)
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
        "loss": loss,  # the global objective, the same on every device
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

        shards = heads.map_head(split, params, params)
        # One shard's shape for tx.init.
        params = heads.map_head(lambda w: w[0], shards, shards)
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
            params=shards, opt_state=heads.map_head(stack, state.opt_state, params)
        )
    return graphdef, eval_graphdef, state


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
    parallel.check_batch(config, devices)
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
    loss_fn = heads.make_loss_fn(config, num_classes=config.num_train_classes)

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
            parallel.pmap_devices(devices),
            head=head,
            num_classes=config.num_train_classes,
        )
        p_state = parallel.to_devices(state, devices, sharded=sharded)
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
            results = parallel.from_process_0(evaluator.targets(host, targets))
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
            metrics = jax.device_get(parallel.unreplicate(p_metrics))
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
            host = parallel.to_host(p_state, sharded=sharded)  # one copy for all three
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
            validate(config.num_train_steps, parallel.to_host(p_state, sharded=sharded))
    finally:
        if batches is not None and hasattr(batches, "close"):
            batches.close()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        ckpt.close()
    host = parallel.to_host(p_state, sharded=sharded)
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
        return parallel.synthetic_batches(config, image_shape, devices, start, end)
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
            state = parallel.full_head(state, self.config.num_train_classes)
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
