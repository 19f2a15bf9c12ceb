"""Device placement of the pmapped step: host layout <-> pmap layout, processes.

The step runs under ``jax.pmap`` with axis name `AXIS_NAME` over the local
devices (all devices of all processes in a multi-host run). The host layout
(what is checkpointed and evaluated) has one copy of every leaf, except that a
sharded head's W and its optimiser slots carry a leading device axis
[devices, C_d, D]; the pmap layout has every leaf on a leading device axis,
replicated or, for that W, split by class. `to_devices` and `to_host` convert;
`full_head` re-joins W for evaluation. Synthetic batches are made on the
devices; `sync_processes` and `from_process_0` are the multi-host agreements.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from train import heads

AXIS_NAME = "batch"


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
    return heads.map_head(
        lambda x: placed(np.asarray(x)),
        state,
        state.params,
        lambda x: replicate(x, devices),
    )


def to_host(p_state, *, sharded=False):
    """pmap layout -> host layout (what is checkpointed and evaluated)."""
    if not sharded:
        return unreplicate(p_state)
    # The head's shards come to the host as one [devices, C_d, D] array.
    return heads.map_head(
        lambda x: np.asarray(jax.device_get(x)), p_state, p_state.params, _first_replica
    )


def full_head(state, num_classes):
    """The host-layout state with a sharded W re-joined to [C, D] (for eval)."""
    params = heads.map_head(
        lambda w: w.reshape(-1, w.shape[-1])[:num_classes], state.params, state.params
    )
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


def pmap_devices(devices):
    """pmap's devices: these local ones, or all when several processes run."""
    return devices if jax.process_count() == 1 else None


def check_batch(config, devices) -> None:
    """Raises ValueError unless the global batch splits evenly over all devices."""
    total = len(devices) * jax.process_count()
    if config.batch_size % total:
        raise ValueError(
            f"config.batch_size {config.batch_size} is not divisible by the "
            f"{total} devices ({jax.process_count()} processes x {len(devices)} "
            "local devices); the global batch is split evenly over them."
        )


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

    p_make = jax.pmap(make, devices=pmap_devices(devices))
    base = jax.random.fold_in(jax.random.PRNGKey(config.seed), jax.process_index())
    for step in range(start, stop):
        yield p_make(jax.random.split(jax.random.fold_in(base, step), len(devices)))


def sync_processes(name: str) -> None:
    """A barrier over the processes of a multi-host run (none with one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def from_process_0(results: dict) -> dict:
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
