"""The input stream alone vs what an IResNet-50 step consumes; host memory vs set size.

    python benchmarks/input_pipeline.py                 # everything below
    python benchmarks/input_pipeline.py --quick         # small sizes, a smoke run

1. **Input alone**: images/s of `train.input_pipeline.train_batches` (read from
   the prepared tfds set + JPEG decode + random flip + batch) on a synthetic
   112x112 JPEG RecordIO set prepared with `python -m train.prepare_recordio`,
   with 0, 1 and 2 worker processes (``config.data_workers``), median batch
   time after the first batch (worker start-up excluded).
2. **One IResNet-50 training step** on the same machine: images/s of the
   face112 step (bf16 body, ArcFace, SGD) on random images made on the
   device (``config.synthetic``), i.e. what the model consumes.
3. **Peak RSS of a training run** (the process and its data workers, summed,
   sampled every 50 ms) on synthetic sets of 5k and 40k 112x112 images, a
   small model and ``data_workers=2``: it must not grow with the set's size.

The synthetic faces are smooth colour fields with noise (about the JPEG size
of real 112x112 crops at quality 95: a few kB). Sets and runs live under
``--root`` (default a temporary directory) and are rebuilt when missing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def _faces(n: int, size: int, num_classes: int, seed: int = 0):
    """n smooth RGB 112x112 images in class runs (insightface's layout)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] / (size - 1)
    labels = np.sort(rng.integers(0, num_classes, n))
    for label in labels:
        a, b, c = (
            rng.uniform(40, 215, 3),
            rng.uniform(-60, 60, 3),
            rng.uniform(-60, 60, 3),
        )
        base = a + b * x[..., None] + c * y[..., None]
        noise = rng.normal(0, 6, (size, size, 1))
        yield np.clip(base + noise, 0, 255).astype(np.uint8), int(label)


def make_set(root: str, n: int, *, size: int = 112) -> tuple[str, int]:
    """A prepared ``insightface_recordio/<S>x<S>`` set: (data_dir, .rec bytes)."""
    from train import prepare_recordio, recordio

    manual = os.path.join(root, f"manual_{n}")
    data_dir = os.path.join(root, f"tfds_{n}")
    if not os.path.exists(os.path.join(manual, "train.rec")):
        os.makedirs(manual, exist_ok=True)
        images, labels = zip(*_faces(n, size, max(n // 20, 2)), strict=True)
        recordio.write_recordio(os.path.join(manual, "train"), images, labels)
    code = prepare_recordio.main(
        [manual, "--data_dir", data_dir, "--image_size", str(size)]
    )
    if code:
        raise SystemExit(code)
    return data_dir, os.path.getsize(os.path.join(manual, "train.rec"))


def input_alone(data_dir: str, workers: int, *, batch: int, steps: int) -> dict:
    """Images/s of the stream: median seconds per batch after the first."""
    from train import input_pipeline

    records, labels = input_pipeline.open_source(
        "insightface_recordio/112x112", data_dir
    )
    rows, remap, _ = input_pipeline.open_set_split(
        labels, len(set(labels)), allow_all=True
    )
    sampler = input_pipeline.BatchSampler(remap, batch_size=batch, seed=0)
    read = input_pipeline.ReadBatch(
        input_pipeline.Subset(records, rows, remap), sampler, random_flip=True
    )
    start = time.perf_counter()
    stream = input_pipeline.train_batches(read, 0, steps + 1, workers=workers)
    times = []
    try:
        next(stream)
        first = time.perf_counter() - start
        for _ in range(steps):
            tick = time.perf_counter()
            next(stream)
            times.append(time.perf_counter() - tick)
    finally:
        stream.close()
    median = statistics.median(times)
    return {
        "workers": workers,
        "images_per_sec": batch / median,
        "first_batch_s": first,
    }


def iresnet50_step(batch: int, steps: int, workdir: str) -> dict:
    """Images/s that one IResNet-50 step consumes (synthetic images, 1 device)."""
    code = f"""
import json, os, sys
sys.path.insert(0, {ROOT!r})
from train import train
from train.configs import face112
config = face112.get_config()
config.update(synthetic=True, batch_size={batch}, num_train_steps={steps + 1},
              warmup_steps=1, log_every_steps=1, checkpoint_every_steps=10**9,
              num_train_classes=85742, tensorboard=False, plots=False)
train.train_and_evaluate(config, {workdir!r})
"""
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    env.pop("XLA_FLAGS", None)  # one device: the step of one accelerator
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    rates = [r["images_per_sec"] for r in records if r["step"] > 1]
    return {"batch": batch, "images_per_sec": statistics.median(rates)}


def peak_rss(data_dir: str, workdir: str, *, steps: int, batch: int) -> float:
    """Peak summed RSS (MiB) of a training run and its worker processes."""
    import psutil

    code = f"""
import sys
sys.path.insert(0, {ROOT!r})
import numpy as np
from train import input_pipeline, train
from train.configs import tiny
if __name__ == "__main__":
    _, labels = input_pipeline.open_source("insightface_recordio/112x112", {data_dir!r})
    config = tiny.get_config()
    config.update(dataset="insightface_recordio/112x112", data_dir={data_dir!r},
                  num_train_classes=len(np.unique(labels)) - 2, batch_size={batch},
                  num_train_steps=10 * {steps}, data_workers=2, random_flip=True,
                  checkpoint_every_steps=10**9, log_every_steps=10)
    # Training only (max_steps: no final evaluation of the held-out classes).
    train.train_and_evaluate(config, {workdir!r}, max_steps={steps})
"""
    script = os.path.join(workdir + ".py")
    with open(script, "w") as f:
        f.write(code)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = psutil.Popen([sys.executable, script], env=env, cwd=ROOT)
    peak = 0
    while proc.poll() is None:
        try:
            family = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in family if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    if proc.returncode:
        raise SystemExit(f"training run failed ({proc.returncode})")
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=None, help="where the sets and runs live")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", default=None, help="also write the results as JSON")
    args = parser.parse_args()
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    root = args.root or tempfile.mkdtemp(prefix="margin_jax_input_bench_")
    small, large = (500, 2000) if args.quick else (5000, 40000)
    batch = 32 if args.quick else args.batch
    steps = 5 if args.quick else 20
    import platform

    print(f"{platform.machine()}, {os.cpu_count()} cores; sets in {root}")
    data_dir, rec_bytes = make_set(root, small)
    results = {"input": [], "rss": []}
    print(
        f"\n112x112 JPEG RecordIO set of {small} images "
        f"({rec_bytes / 2**20:.1f} MiB .rec), batch {batch}"
    )
    print("| input stream | images/s | first batch s |")
    print("|---|---:|---:|")
    for workers in (0, 1, 2):
        row = input_alone(data_dir, workers, batch=batch, steps=steps)
        results["input"].append(row)
        print(
            f"| {workers} workers | {row['images_per_sec']:.0f} | "
            f"{row['first_batch_s']:.1f} |"
        )
    step_batch = 4 if args.quick else 16
    row = iresnet50_step(
        step_batch, 2 if args.quick else 4, os.path.join(root, "iresnet50")
    )
    results["iresnet50"] = row
    print(
        f"| IResNet-50 train step (bf16, batch {step_batch}, 1 CPU device) consumes | "
        f"{row['images_per_sec']:.1f} | |"
    )
    print("\n| training run (small CNN, 2 workers) | images | peak RSS MiB |")
    print("|---|---:|---:|")
    for n in (small, large):
        data_dir, _ = make_set(root, n)
        rss = peak_rss(
            data_dir, os.path.join(root, f"run_{n}"), steps=steps * 2, batch=batch
        )
        results["rss"].append({"images": n, "peak_rss_mib": rss})
        print(f"| synthetic 112x112 set | {n} | {rss:.0f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
