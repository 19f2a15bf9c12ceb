"""Benchmark of margin_jax.eval: retrieval at 100k x 512, verification at 6,000 pairs.

    python benchmarks/eval.py            # full sizes (several minutes on 2 cores)
    python benchmarks/eval.py --quick    # small sizes, a smoke run

Each measurement runs in a fresh subprocess (this script with --worker), so
peak memory is per measurement and imports or caches of one do not help
another. Reported per row:

  time      wall-clock seconds of the metric call alone (data generation and
            imports excluded; JIT compilation included).
  peak RSS  the worker's resident-set high-water mark (resource.getrusage
            ru_maxrss) after the call: Python, NumPy/JAX/torch runtimes and
            the input arrays included.
  +RSS      how much the call raised that high-water mark: its extra memory
            beyond everything held before it (a lower bound if the call's
            peak fell under an earlier one).

Embeddings are clustered: `--classes` random unit centres in `--dim`
dimensions, `--n / --classes` items each, Gaussian noise, rows L2-normalised.
pytorch-metric-learning's AccuracyCalculator (precision_at_1, r_precision,
mean_average_precision_at_r, k="max_bin_count") runs on the same embeddings.
Its default kNN is faiss, which is not installed here, so it is given its own
torch kNN: CustomKNN(CosineSimilarity(), batch_size=--pml-batch), blockwise
like ours. It is run at --pml-n items (default: the full --n).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _rss_mib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _clustered(n, dim, classes, noise, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.arange(n) % classes
    x = np.empty((n, dim), np.float32)
    for start in range(0, n, 10_000):  # chunks keep the RSS baseline low
        stop = min(start + 10_000, n)
        block = rng.standard_normal((stop - start, dim), dtype=np.float32)
        x[start:stop] = centres[labels[start:stop]] + noise / np.sqrt(dim) * block
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels


def _pairs(n_pairs, dim, noise, seed=1):
    import numpy as np

    rng = np.random.default_rng(seed)
    e1 = rng.standard_normal((n_pairs, dim), dtype=np.float32)
    same = np.arange(n_pairs) % 2 == 0  # LFW: half genuine
    other = rng.standard_normal((n_pairs, dim), dtype=np.float32)
    near = e1 + noise * rng.standard_normal((n_pairs, dim), dtype=np.float32)
    e2 = np.where(same[:, None], near, other)
    return e1, e2, same


def _worker(args) -> dict:
    """Run one measurement; return its numbers (printed as JSON)."""
    import numpy as np

    from margin_jax import eval as ev

    case = args.worker
    result = {}
    if case in ("recall", "retrieval", "pml"):
        n = args.pml_n if case == "pml" or args.at_pml_n else args.n
        x, y = _clustered(n, args.dim, args.classes * n // args.n, args.noise)
        result["size"] = f"{n} x {args.dim}"
        if case == "pml":
            import torch
            from pytorch_metric_learning.distances import CosineSimilarity
            from pytorch_metric_learning.utils.accuracy_calculator import (
                AccuracyCalculator,
            )
            from pytorch_metric_learning.utils.inference import CustomKNN

            calc = AccuracyCalculator(
                include=(
                    "precision_at_1",
                    "r_precision",
                    "mean_average_precision_at_r",
                ),
                k="max_bin_count",
                knn_func=CustomKNN(CosineSimilarity(), batch_size=args.pml_batch),
                device=torch.device("cpu"),
            )
            fn = lambda: calc.get_accuracy(x, y)  # noqa: E731
        elif case == "recall":
            fn = lambda: ev.recall_at_k(x, y, ks=(1, 2, 4, 8))  # noqa: E731
        else:
            fn = lambda: ev.retrieval_metrics(x, y)  # noqa: E731
    elif case == "verification":
        e1, e2, same = _pairs(args.pairs, args.dim, args.pair_noise)
        result["size"] = f"{args.pairs} pairs x {args.dim}"
        fn = lambda: ev.verification_accuracy(e1, e2, same)  # noqa: E731
    elif case in ("tar", "sklearn_roc"):
        rng = np.random.default_rng(2)
        same = rng.random(args.roc_pairs) < 0.01
        scores = rng.standard_normal(args.roc_pairs) + 3.0 * same
        result["size"] = f"{args.roc_pairs} scores"
        if case == "tar":
            fn = lambda: ev.tar_at_far(scores, same)  # noqa: E731
        else:
            from sklearn.metrics import roc_curve

            fn = lambda: roc_curve(same, scores)  # noqa: E731
    else:
        raise SystemExit(f"unknown worker case {case!r}")
    before = _rss_mib()
    start = time.perf_counter()
    out = fn()
    result["time_s"] = time.perf_counter() - start
    after = _rss_mib()
    result["peak_rss_mib"] = after
    result["delta_rss_mib"] = after - before
    if isinstance(out, dict):
        result["values"] = {
            k: round(float(v), 4)
            for k, v in out.items()
            if np.ndim(v) == 0 and not k.startswith("num_")
        }
    else:
        result["values"] = {"roc_points": len(out[0])}
    return result


def _run(case, args, extra=()) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", case, *extra]
    for flag in ("n", "dim", "classes", "noise", "pairs", "pair_noise", "roc_pairs"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    cmd += ["--pml-n", str(args.pml_n), "--pml-batch", str(args.pml_batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="retrieval embeddings")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=10_000)
    p.add_argument("--noise", type=float, default=2.5, help="within-class noise")
    p.add_argument("--pairs", type=int, default=6_000, help="verification pairs")
    p.add_argument("--pair-noise", type=float, default=4.5)
    p.add_argument("--roc-pairs", type=int, default=1_000_000, help="TAR@FAR scores")
    p.add_argument("--pml-n", type=int, default=None, help="PML size (default --n)")
    p.add_argument("--pml-batch", type=int, default=512, help="PML kNN batch rows")
    p.add_argument("--skip-pml", action="store_true")
    p.add_argument("--quick", action="store_true", help="small sizes, seconds")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--at-pml-n", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.n, args.dim, args.classes = 5_000, 128, 500
        args.pairs, args.roc_pairs = 600, 20_000
    if args.pml_n is None:
        args.pml_n = args.n
    if args.worker:
        print(json.dumps(_worker(args)))
        return

    rows = [
        ("margin_jax recall_at_k (1,2,4,8)", _run("recall", args)),
        ("margin_jax retrieval_metrics", _run("retrieval", args)),
    ]
    if not args.skip_pml:
        if args.pml_n != args.n:
            rows.append(
                (
                    "margin_jax retrieval_metrics",
                    _run("retrieval", args, ["--at-pml-n"]),
                )
            )
        rows.append(("PML AccuracyCalculator (torch kNN)", _run("pml", args)))
    rows += [
        ("margin_jax verification_accuracy", _run("verification", args)),
        ("margin_jax tar_at_far (6 FARs)", _run("tar", args)),
        ("sklearn roc_curve (reference)", _run("sklearn_roc", args)),
    ]

    import platform

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print("| measurement | size | time s | peak RSS MiB | +RSS MiB | values |")
    print("|---|---|---:|---:|---:|---|")
    for name, r in rows:
        if "error" in r:
            print(f"| {name} | | | | | failed: {r['error']} |")
            continue
        values = ", ".join(f"{k}={v}" for k, v in r["values"].items())
        print(
            f"| {name} | {r['size']} | {r['time_s']:.2f} | "
            f"{r['peak_rss_mib']:.0f} | {r['delta_rss_mib']:.0f} | {values} |"
        )


if __name__ == "__main__":
    main()
