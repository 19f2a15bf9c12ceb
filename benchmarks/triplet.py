"""Mined triplet loss, forward + backward on CPU: margin_jax vs pytorch-metric-learning.

Usage:
  .venv/bin/python benchmarks/triplet.py            # B=1024, D=256
  .venv/bin/python benchmarks/triplet.py --quick    # small and fast

Both sides get the same L2-normalised float32 embeddings and P×K labels (K images
per class) and compute loss + gradient with respect to the embeddings. Times are
medians over the timed runs; compilation / warm-up runs are excluded.

The two do not compute the same number: margin_jax's semi-hard is FaceNet's rule
as tensorflow-addons computes it (one negative per positive pair, squared L2);
pytorch-metric-learning's TripletMarginMiner("semihard") keeps every triplet with
D(a,p) < D(a,n) < D(a,p) + margin (L2 distance) and TripletMarginLoss averages
the non-zero ones. The table compares the cost of a mined triplet step.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from _timing import median_seconds  # noqa: E402

from margin_jax.pairs import triplet_loss  # noqa: E402


def _inputs(batch: int, dim: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = np.repeat(np.arange(batch // k + 1), k)[:batch].astype(np.int32)
    return x, y


def _median_seconds(fn, warmup: int, repeats: int) -> float:
    return median_seconds(fn, repeats=repeats, warmup=warmup)


def time_jax(x, y, mining: str, margin: float, warmup: int, repeats: int) -> float:
    step = jax.jit(
        jax.value_and_grad(
            lambda x, y: triplet_loss(x, y, margin=margin, mining=mining)
        )
    )
    x, y = jnp.asarray(x), jnp.asarray(y)
    return _median_seconds(
        lambda: jax.block_until_ready(step(x, y)), max(warmup, 1), repeats
    )


def time_pml(x, y, miner_name: str, margin: float, warmup: int, repeats: int):
    try:
        import torch
        from pytorch_metric_learning import losses, miners
    except ImportError:  # the benchmark extra is not installed
        return None
    loss_fn = losses.TripletMarginLoss(margin=margin)
    if miner_name == "semihard":
        miner = miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard")
    else:
        miner = miners.BatchHardMiner()
    labels = torch.from_numpy(y.astype(np.int64))

    def step():
        emb = torch.tensor(x, requires_grad=True)
        loss = loss_fn(emb, labels, miner(emb, labels))
        loss.backward()
        return emb.grad

    return _median_seconds(step, warmup, repeats)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=4, help="images per class (P×K)")
    parser.add_argument("--margin", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="B=256, D=64, 3 runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.dim, args.repeats = 256, 64, 3

    x, y = _inputs(args.batch, args.dim, args.k, args.seed)
    rows = [
        (
            "margin_jax triplet_loss(mining='semi_hard')",
            time_jax(x, y, "semi_hard", args.margin, args.warmup, args.repeats),
        ),
        (
            "margin_jax triplet_loss(mining='batch_hard')",
            time_jax(x, y, "batch_hard", args.margin, args.warmup, args.repeats),
        ),
        (
            "PML TripletMarginLoss + TripletMarginMiner('semihard')",
            time_pml(x, y, "semihard", args.margin, args.warmup, args.repeats),
        ),
        (
            "PML TripletMarginLoss + BatchHardMiner",
            time_pml(x, y, "batchhard", args.margin, args.warmup, args.repeats),
        ),
    ]
    baseline = rows[2][1]
    try:
        import torch

        threads = f", torch threads {torch.get_num_threads()}"
    except ImportError:
        threads = ""
    print(
        f"B={args.batch}, D={args.dim}, {args.batch // args.k} classes × {args.k}, "
        f"margin {args.margin}, median of {args.repeats} runs, forward + backward, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"{os.cpu_count()} CPUs{threads}\n"
    )
    print("| method | median ms | PML semihard / this |")
    print("|---|---:|---:|")
    for name, seconds in rows:
        if seconds is None:
            print(f"| {name} | n/a (pytorch-metric-learning not installed) | |")
            continue
        ratio = f"{baseline / seconds:.1f}x" if baseline else ""
        print(f"| {name} | {seconds * 1e3:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
