"""Forward + backward time of every margin-softmax loss, as ratios within one run.

For each class count C, times the jitted value-and-gradient w.r.t. embeddings
x [B, D] and class centres W [C, D] of every loss (cosine_logits included),
next to, on the same shapes and in the same run:

* plain softmax CE on x @ W.T (optax.softmax_cross_entropy_with_integer_labels),
* the bare matmul floor: forward x @ W.T and its two backward matmuls,
* pytorch-metric-learning's loss of the same name, where one exists and torch is
  installed (``pip install margin-jax[benchmark]``), on the same data;

and, separately, the loss stages alone (value and gradient w.r.t. a given cos
[B, C], no matmul, no normalisation) next to optax's softmax CE on logits of the
same shape.

Ratios, not absolute times, are the result: these machines are noisy.

    python benchmarks/losses.py                 # B=256, D=512, C=10k and 100k
    python benchmarks/losses.py --quick         # C=1k, a smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from _timing import median_ms_jax, median_seconds  # noqa: E402

import margin_jax as mj  # noqa: E402


def _registered(factory):
    """(cos, labels) -> [B] of a `margin_jax.NAMED_STAGES` entry, its defaults."""
    stages = factory()

    def loss(cos, labels):
        out = mj.margin_softmax_loss(cos, labels, stages=stages)
        return out if stages.state is None else out[0]

    return loss


def _losses(num_classes: int) -> dict:
    """Every loss of the registry with the library's defaults."""
    del num_classes
    return {name: _registered(f) for name, f in mj.NAMED_STAGES.items()}


def _jax_step(loss_fn):
    def total(x, w, y):
        return jnp.mean(loss_fn(mj.cosine_logits(x, w), y))

    return jax.jit(jax.value_and_grad(total, argnums=(0, 1)))


def _loss_only_step(loss_fn):
    """The loss stages alone: value and gradient w.r.t. a given cos [B, C]."""
    return jax.jit(jax.value_and_grad(lambda c, y: jnp.mean(loss_fn(c, y))))


def _ce_only_step():
    return jax.jit(
        jax.value_and_grad(
            lambda z, y: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(z, y))
        )
    )


def _softmax_ce_step():
    def total(x, w, y):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x @ w.T, y))

    return jax.jit(jax.value_and_grad(total, argnums=(0, 1)))


def _matmul_floor():
    def fwd_bwd(x, w, g):
        out, vjp = jax.vjp(lambda x, w: x @ w.T, x, w)
        return out[0, 0], vjp(g)

    return jax.jit(fwd_bwd)


def _pml_losses(num_classes: int, dim: int):
    """PML losses of the same name, in radians/scale matched to ours."""
    try:
        import torch
        from pytorch_metric_learning import losses as pml
    except ImportError:
        return None, {}
    torch.set_num_threads(os.cpu_count() or 1)
    kw = dict(num_classes=num_classes, embedding_size=dim)
    table = {
        "normface": lambda: pml.NormalizedSoftmaxLoss(temperature=1 / 64.0, **kw),
        "cosface": lambda: pml.CosFaceLoss(margin=0.35, scale=64, **kw),
        "arcface": lambda: pml.ArcFaceLoss(margin=np.degrees(0.5), scale=64, **kw),
        "sphereface": lambda: pml.SphereFaceLoss(margin=4, scale=64, **kw),
    }
    return torch, table


def _time_torch(torch, loss, x, w, y, repeats: int) -> float:
    xt = torch.tensor(x, requires_grad=True)
    # PML stores W as [D, C].
    with torch.no_grad():
        loss.W.copy_(torch.tensor(w.T))
    yt = torch.tensor(y, dtype=torch.long)

    def step():
        xt.grad = None
        loss.W.grad = None
        out = loss(xt, yt)
        out.backward()
        return out

    return 1e3 * median_seconds(step, repeats=repeats)


def run(batch: int, dim: int, classes: list[int], repeats: int, pml: bool) -> str:
    rows = []
    header = (
        "| loss | C | fwd+bwd ms | × softmax CE | × matmul floor | PML ms | × PML "
        "| loss stages ms | × CE on logits |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for num_classes in classes:
        rng = np.random.default_rng(0)
        x = rng.normal(size=(batch, dim)).astype(np.float32)
        w = rng.normal(size=(num_classes, dim)).astype(np.float32)
        y = rng.integers(0, num_classes, batch).astype(np.int32)
        g = rng.normal(size=(batch, num_classes)).astype(np.float32)
        xj, wj, yj, gj = map(jnp.asarray, (x, w, y, g))
        print(f"C={num_classes}: baselines", file=sys.stderr, flush=True)
        floor = median_ms_jax(_matmul_floor(), xj, wj, gj, repeats=repeats)
        ce = median_ms_jax(_softmax_ce_step(), xj, wj, yj, repeats=repeats)
        cos = jnp.clip(jnp.asarray(g) * 0.3, -1.0, 1.0)
        ce_only = median_ms_jax(_ce_only_step(), 64.0 * cos, yj, repeats=repeats)
        rows.append(
            f"| bare matmul fwd+bwd | {num_classes} | {floor:.1f} | "
            f"{floor / ce:.2f} | 1.00 | | | | |"
        )
        rows.append(
            f"| softmax CE on x·Wᵀ | {num_classes} | {ce:.1f} | 1.00 | "
            f"{ce / floor:.2f} | | | {ce_only:.1f} | 1.00 |"
        )
        torch, pml_table = _pml_losses(num_classes, dim) if pml else (None, {})
        for name, loss_fn in _losses(num_classes).items():
            print(f"C={num_classes}: {name}", file=sys.stderr, flush=True)
            ms = median_ms_jax(_jax_step(loss_fn), xj, wj, yj, repeats=repeats)
            stage_ms = median_ms_jax(_loss_only_step(loss_fn), cos, yj, repeats=repeats)
            pml_ms, ratio = "", ""
            if name in pml_table:
                t = _time_torch(torch, pml_table[name](), x, w, y, repeats)
                pml_ms, ratio = f"{t:.1f}", f"{ms / t:.2f}"
            rows.append(
                f"| {name} | {num_classes} | {ms:.1f} | {ms / ce:.2f} | "
                f"{ms / floor:.2f} | {pml_ms} | {ratio} | {stage_ms:.1f} | "
                f"{stage_ms / ce_only:.2f} |"
            )
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].platform}, "
        f"jax {jax.__version__}"
    )
    return (
        f"B={batch}, D={dim}, median of {repeats} runs after warm-up; {machine}\n\n"
        + header
        + "\n"
        + "\n".join(rows)
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", default="10000,100000")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-pml", action="store_true", help="skip PyTorch")
    parser.add_argument("--quick", action="store_true", help="C=1000, 2 repeats")
    args = parser.parse_args(argv)
    classes = [int(c) for c in args.classes.split(",")]
    if args.quick:
        classes, args.repeats = [1000], 2
    print(run(args.batch, args.dim, classes, args.repeats, not args.no_pml))


if __name__ == "__main__":
    main()
