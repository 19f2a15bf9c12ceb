"""Dense vs class-chunked vs class-sharded margin loss: time and memory.

For B=256, D=512 and C in {100k, 1M} (ArcFace, s=64, m=0.5) this times the
jitted forward + backward w.r.t. embeddings and W of

* dense: margin_softmax_loss(cosine_logits(x, W), ...) (skipped with --no-dense-at),
* chunked: chunked_margin_loss(x, W, ...) with --chunk classes per block (0,
  the default: margin_jax.default_chunk_size, from the backend's memory budget),
* sharded: sharded_margin_loss over 8 fake CPU devices under pmap (run in a
  subprocess, since the device count is fixed when JAX starts),

and reports XLA's own memory analysis of each compiled step: ``temp`` is the
scratch memory the computation needs besides its inputs and outputs (x, W and
dW), i.e. the loss's working memory, compared with the size of the dense logits
[B, C] in float32. Times are medians after a warm-up; compare ratios only.

    python benchmarks/large.py                      # C = 100k and 1M
    python benchmarks/large.py --classes 20000 --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import median_ms_jax  # noqa: E402


def _temp_bytes(fn, *args) -> int:
    analysis = fn.lower(*args).compile().memory_analysis()
    return int(getattr(analysis, "temp_size_in_bytes", -1)) if analysis else -1


def _single(kind, batch, dim, num_classes, chunk, repeats):
    import jax

    sys.path.insert(0, ROOT)
    import margin_jax as mj

    stages = mj.NAMED_STAGES["arcface"](margin=0.5, scale=64.0)
    key_x, key_w, key_y = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key_x, (batch, dim))
    w = jax.random.normal(key_w, (num_classes, dim))
    y = jax.random.randint(key_y, (batch,), 0, num_classes)

    if kind == "dense":

        def loss(x, w):
            cos = mj.cosine_logits(x, w)
            return mj.margin_softmax_loss(cos, y, stages=stages).mean()

    elif kind == "chunked":

        def loss(x, w):
            return mj.chunked_margin_loss(
                x, w, y, stages=stages, chunk_size=chunk or None
            ).mean()

    else:
        raise ValueError(kind)
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    temp = _temp_bytes(step, x, w)
    return {"ms": median_ms_jax(step, x, w, repeats=repeats), "temp": temp}


def _sharded(batch, dim, num_classes, chunk, repeats):
    import jax

    sys.path.insert(0, ROOT)
    import margin_jax as mj

    n_dev = jax.local_device_count()
    rows = -(-num_classes // n_dev)
    stages = mj.NAMED_STAGES["arcface"](margin=0.5, scale=64.0)
    key_x, key_w, key_y = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key_x, (n_dev, batch // n_dev, dim))
    w = jax.random.normal(key_w, (n_dev, rows, dim))
    y = jax.random.randint(key_y, (n_dev, batch // n_dev), 0, num_classes)

    def local(x, ws, y):
        loss = mj.sharded_margin_loss(
            x,
            ws,
            y,
            axis_name="d",
            stages=stages,
            chunk_size=min(chunk, rows) if chunk else None,
            num_classes=num_classes,
        )
        return loss.sum() / batch

    step = jax.pmap(jax.value_and_grad(local, argnums=(0, 1)), axis_name="d")
    return {
        "ms": median_ms_jax(step, x, w, y, repeats=repeats),
        "temp": -1,
        "devices": n_dev,
    }


def _child(args):
    """Runs one measurement in this process and prints it as JSON."""
    if args.kind == "sharded":
        result = _sharded(args.batch, args.dim, args.one, args.chunk, args.repeats)
    else:
        result = _single(
            args.kind, args.batch, args.dim, args.one, args.chunk, args.repeats
        )
    print(json.dumps(result))


def _run(kind, num_classes, args):
    env = dict(os.environ)
    if kind == "sharded":
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--one",
        str(num_classes),
        "--batch",
        str(args.batch),
        "--dim",
        str(args.dim),
        "--chunk",
        str(args.chunk),
        "--repeats",
        str(args.repeats),
    ]
    print(f"C={num_classes}: {kind}", file=sys.stderr, flush=True)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return {
            "error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"
        }
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", default="100000,1000000")
    parser.add_argument("--chunk", type=int, default=0, help="0: the memory budget")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--no-dense-at",
        type=int,
        default=10**9,
        help="skip dense for C at or above this",
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", choices=["dense", "chunked", "sharded"])
    parser.add_argument("--one", type=int)
    args = parser.parse_args(argv)
    if args.child:
        args.kind = args.child
        return _child(args)
    if args.quick:
        args.classes, args.repeats = "20000", 2

    lines = [
        "| C | form | ms | × dense | loss temp MiB | temp / dense logits |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for num_classes in (int(c) for c in args.classes.split(",")):
        logits_mib = args.batch * num_classes * 4 / 2**20
        results = {}
        kinds = ["chunked", "sharded"]
        if num_classes < args.no_dense_at:
            kinds.insert(0, "dense")
        for kind in kinds:
            results[kind] = _run(kind, num_classes, args)
        dense_ms = results.get("dense", {}).get("ms")
        for kind, res in results.items():
            if "error" in res:
                lines.append(
                    f"| {num_classes} | {kind} | failed: {res['error']} | | | |"
                )
                continue
            ratio = f"{res['ms'] / dense_ms:.2f}" if dense_ms else ""
            label = (
                kind
                if kind != "sharded"
                else f"sharded ({res['devices']} fake CPU devices)"
            )
            temp = res["temp"]
            temp_mib = f"{temp / 2**20:.1f}" if temp >= 0 else "n/a"
            share = f"{100 * temp / 2**20 / logits_mib:.1f}%" if temp >= 0 else "n/a"
            lines.append(
                f"| {num_classes} | {label} | {res['ms']:.0f} | {ratio} | "
                f"{temp_mib} | {share} |"
            )
    import jax

    print(
        f"B={args.batch}, D={args.dim}, ArcFace, chunk={args.chunk or 'default'}, "
        "median of "
        f"{args.repeats} after warm-up; {platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} (CPU)\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
