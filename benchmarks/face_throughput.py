"""Training throughput of an IResNet + ArcFace head on synthetic 112x112 faces.

Times one jitted optimiser step, forward + backward + SGD update of the
backbone and of the class centres W [C, 512], on random images (no input
pipeline: this is the device's ceiling), the way `train.train` steps:
BatchNorm in training mode, ArcFace (s=64, m=0.5) on the dense cosine logits,
SGD with momentum 0.9 and weight decay 5e-4, state donated. Reports images/s
(median step over --steps after a warm-up; compilation excluded) and XLA's
memory analysis of the compiled step: ``arguments`` are the parameters,
optimiser state, batch statistics and the batch; ``temp`` is the scratch the
step needs besides them (activations kept for the backward, gradients,
logits [B, C]).

    python benchmarks/face_throughput.py --quick          # CPU smoke run
    python benchmarks/face_throughput.py --arch iresnet50 --bf16   # one GPU
    python benchmarks/face_throughput.py --arch iresnet100 --classes 1000000 --bf16

One device, ``--batch`` images per device; with pmap the per-device step is
the same plus the all-reduce of the gradients.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _mib(n) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def build(args):
    """(jitted step, initial (params, batch_stats, opt_state), batch, sizes)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    sys.path.insert(0, ROOT)
    import margin_jax as mj
    from train import iresnet, models

    rngs = nnx.Rngs(0)
    image_shape = (args.size, args.size, 3)
    backbone = iresnet.create_iresnet(
        args.arch,
        image_shape,
        width_multiplier=args.width,
        embedding_dim=args.dim,
        compute_dtype="bfloat16" if args.bf16 else "float32",
        rngs=rngs,
    )
    model = iresnet.IResNetModel(
        backbone, models.MarginHead(args.classes, args.dim, rngs=rngs)
    )
    model.train()
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
    opt_state = tx.init(params)
    target_fn = functools.partial(mj.arcface_target, margin=0.5)

    def step(state, images, labels):
        params, batch_stats, opt_state = state

        def objective(params):
            model = nnx.merge(graphdef, params, batch_stats, copy=True)
            embeddings = model(images)
            cos = mj.cosine_logits(embeddings, model.head.weight[...])
            loss = mj.margin_softmax_loss(
                cos, labels, target_fn=target_fn, scale=64.0
            ).mean()
            return loss, nnx.state(model, nnx.BatchStat)

        (loss, new_stats), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), new_stats, opt_state), loss

    key_x, key_y = jax.random.split(jax.random.key(1))
    images = jax.random.normal(key_x, (args.batch, *image_shape), jnp.float32)
    labels = jax.random.randint(key_y, (args.batch,), 0, args.classes)
    jitted = jax.jit(step, donate_argnums=(0,))
    head = args.classes * args.dim
    sizes = (sum(x.size for x in jax.tree.leaves(params)) - head, head)
    return jitted, (params, batch_stats, opt_state), (images, labels), sizes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch",
        default="iresnet50",
        choices=["iresnet18", "iresnet34", "iresnet50", "iresnet100"],
    )
    parser.add_argument("--classes", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=128, help="per device")
    parser.add_argument("--size", type=int, default=112, help="image side")
    parser.add_argument("--width", type=float, default=1.0, help="width multiplier")
    parser.add_argument("--dim", type=int, default=512, help="embedding size")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 compute")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CPU smoke run: iresnet18, 32x32, width 0.25, C=1000, batch 8",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.arch, args.size, args.width = "iresnet18", 32, 0.25
        args.classes, args.batch, args.steps, args.warmup = 1000, 8, 5, 1

    import jax

    step, state, (images, labels), (backbone_params, head_params) = build(args)
    start = time.perf_counter()
    compiled = step.lower(state, images, labels).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()

    for _ in range(args.warmup):
        state, loss = compiled(state, images, labels)
    jax.block_until_ready(loss)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, loss = compiled(state, images, labels)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)

    device = jax.devices()[0]
    print(
        f"{args.arch} {args.size}x{args.size} width x{args.width:g}, D={args.dim}, "
        f"C={args.classes:,}, batch {args.batch}, "
        f"{'bfloat16' if args.bf16 else 'float32'} compute"
    )
    print(f"device: {device.platform} {device.device_kind}, jax {jax.__version__}")
    print(f"parameters: {backbone_params:,} backbone + {head_params:,} head W")
    print(
        f"compile: {compile_s:.1f} s; loss after {args.warmup + args.steps} steps: "
        f"{float(loss):.3f}"
    )
    print(
        f"step: {1e3 * median:.1f} ms median of {args.steps} "
        f"(min {1e3 * min(times):.1f}, max {1e3 * max(times):.1f})"
    )
    print(f"throughput: {args.batch / median:,.1f} images/s")
    if memory is None:
        print("memory analysis: not available on this backend")
        return
    fields = (
        ("arguments", "argument_size_in_bytes"),
        ("outputs", "output_size_in_bytes"),
        ("aliased (donated)", "alias_size_in_bytes"),
        ("temp", "temp_size_in_bytes"),
        ("generated code", "generated_code_size_in_bytes"),
    )
    print("XLA memory analysis of the step:")
    for label, attr in fields:
        value = getattr(memory, attr, None)
        if value is not None:
            print(f"  {label:18s} {_mib(value)}")
    logits = 4 * args.batch * args.classes
    print(f"  (dense logits [B, C] in float32: {_mib(logits)})")


if __name__ == "__main__":
    main()
