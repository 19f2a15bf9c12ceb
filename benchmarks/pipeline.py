"""Start-up cost of the pmapped train step: host state vs state placed like its outputs.

python benchmarks/pipeline.py [--steps 3] [--devices 1]

The step's outputs are arrays sharded over the devices. State handed to the
first call as host NumPy arrays (what `train.replicate` returned before)
compiles the step once for host inputs and again when its own outputs come
back; `train.replicate` / `train.to_devices` now place the state like the
outputs, so the step compiles once. This script runs the first ``--steps``
steps of the default digits config both ways in one process and reports the
number of XLA compilations of the step and the wall time of those steps.
"""

from __future__ import annotations

import argparse
import os
import time


def _parse():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--devices", type=int, default=1, help="fake CPU devices")
    return parser.parse_args()


class _CompileCounter:
    """Counts XLA backend compilations (jax.monitoring's compile event)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0

    def __call__(self, event, duration, **kwargs):
        if event == self.EVENT:
            self.count += 1


def main():
    args = _parse()
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={args.devices}"
    )
    import jax
    import numpy as np

    from train import input_pipeline, train
    from train.configs import digits

    counter = _CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter)

    config = digits.get_config()
    devices = jax.local_devices()
    data, _ = train.load_data(config)
    tx, _ = train.create_optimizer(config)
    loss_fn = train.make_loss_fn(config, config.num_train_classes)
    batches = [
        input_pipeline.shard(
            {
                "image": data.images[np.arange(config.batch_size) + i],
                "label": data.labels[np.arange(config.batch_size) + i],
            },
            len(devices),
        )
        for i in range(args.steps)
    ]

    def host(state):  # the old train.replicate: NumPy views, no placement
        n = len(devices)
        return jax.tree.map(
            lambda x: np.broadcast_to(np.asarray(x), (n, *x.shape)), state
        )

    print(
        f"{jax.device_count()} device(s) ({jax.devices()[0].platform}), "
        f"default digits config, first {args.steps} steps"
    )
    print("| state handed to the first step | step compilations | seconds |")
    print("|---|---|---|")
    results = {}
    for name, place in (("host NumPy (before)", host), ("train.replicate (now)", None)):
        graphdef, _, state = train.create_train_state(
            config, data.images.shape[1:], config.num_train_classes, tx
        )
        p_state = train.replicate(state, devices) if place is None else place(state)
        p_step = train.make_p_train_step(
            graphdef, tx, loss_fn, devices, num_classes=config.num_train_classes
        )
        counter.count = 0
        start = time.perf_counter()
        for batch in batches:
            p_state, metrics = p_step(p_state, batch)
        jax.block_until_ready(metrics)
        results[name] = time.perf_counter() - start
        print(f"| {name} | {counter.count} | {results[name]:.2f} |")
    before, now = results.values()
    print(f"\nratio before / now: {before / now:.2f}x")


if __name__ == "__main__":
    main()
