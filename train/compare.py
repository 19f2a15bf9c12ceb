"""The losses side by side: python -m train.compare --seeds 0,1,2 --out DIR.

Trains every method of `METHODS` on the digits default (small CNN, classes
0-6, the default optimiser and step budget; ``--steps`` overrides the number
of steps for all of them) once per seed, evaluates on the held-out classes and
writes DIR/compare.md (mean ± sample std over the seeds of the held-out
verification accuracy, Recall@1 and NMI) and DIR/compare.json (every run and
the summary). Each run trains in DIR/runs/<method>/steps<N>_seed<S> and
resumes there, so an interrupted comparison picks up where it stopped.

Every method uses its family config (train/configs/<name>.py); the softmax +
triplet regulariser is the two-head version of the same backbone and needs
P x K batches (see train/configs/softmax_triplet.py).
"""

from __future__ import annotations

import importlib
import json
import os
import time

import numpy as np
from absl import app, flags, logging

# name -> (label in the table, config module under train/configs)
METHODS = {
    "softmax": ("Softmax", "softmax"),
    "normface": ("NormFace", "normface"),
    "sphereface": ("SphereFace (A-Softmax)", "sphereface"),
    "cosface": ("CosFace", "cosface"),
    "arcface": ("ArcFace", "default"),
    "sv_softmax": ("SV-Arc-Softmax", "sv_softmax"),
    "mv_softmax": ("MV-AM-Softmax", "mv_softmax"),
    "eqm": ("EqM", "eqm"),
    "center_softmax": ("Center loss + softmax", "center_softmax"),
    "softmax_triplet": ("Softmax + triplet (two-head)", "softmax_triplet"),
}
METRICS = {
    "verification_accuracy": "Verification acc.",
    "recall_at_1": "Recall@1",
    "nmi": "NMI",
}

_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds, comma separated.")
_STEPS = flags.DEFINE_integer(
    "steps", None, "Training steps of every run (default: the config's)."
)
_OUT = flags.DEFINE_string("out", None, "Output directory (runs, table, JSON).")
_METHODS = flags.DEFINE_list(
    "methods", list(METHODS), f"Subset of: {', '.join(METHODS)}."
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data_dir (config default).")


def method_config(method: str, *, seed: int, steps: int | None, data_dir=None):
    """The config of one run: the family config, seeded, quiet, no plots."""
    if method not in METHODS:
        raise ValueError(
            f"Unknown method {method!r}; valid choices: {', '.join(METHODS)}."
        )
    module = importlib.import_module(f"train.configs.{METHODS[method][1]}")
    config = module.get_config()
    config.seed = seed
    if steps is not None:
        config.num_train_steps = steps
    if data_dir is not None:
        config.data_dir = data_dir
    config.progress_bar = False
    config.tensorboard = False
    config.plots = False
    return config


def _summary(runs: dict) -> dict:
    summary = {}
    for method, by_seed in runs.items():
        summary[method] = {}
        for metric in METRICS:
            # A diverged run is NaN and makes the mean NaN: it is not hidden.
            values = np.array([r[metric] for r in by_seed.values()])
            std = values.std(ddof=1) if len(values) > 1 else 0.0
            summary[method][metric] = {
                "mean": float(values.mean()),
                "std": float(std),
                "n": len(values),
            }
    return summary


def markdown_table(summary: dict, *, steps, seeds) -> str:
    """The comparison as a markdown table (mean ± sample std over seeds)."""
    header = ["Method", "Loss (config.loss)", *METRICS.values()]
    lines = [
        f"Held-out digits 7-9 (never trained on), {steps} steps, seeds "
        f"{', '.join(map(str, seeds))}: mean ± sample std over the seeds.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for method, metrics in summary.items():
        loss = dict(method_config(method, seed=0, steps=None).loss)
        name = loss.pop("name")
        hyper = ", ".join(f"{k}={v}" for k, v in loss.items())
        cells = [f"{metrics[m]['mean']:.4f} ± {metrics[m]['std']:.4f}" for m in METRICS]
        loss_cell = f"`{name}`" + (f" ({hyper})" if hyper else "")
        lines.append(
            f"| {METHODS[method][0]} | {loss_cell} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def compare(methods, seeds, out: str, *, steps=None, data_dir=None, log=print):
    """Trains and evaluates every (method, seed); writes the table and JSON.

    Returns:
      The JSON-ready dict written to ``out``/compare.json.
    """
    from train import train  # after absl has parsed the flags (jax config)

    for method in methods:
        method_config(method, seed=0, steps=steps)  # unknown names fail at once
    os.makedirs(out, exist_ok=True)
    runs: dict = {m: {} for m in methods}
    total, done = len(methods) * len(seeds), 0
    record = {}
    for method in methods:
        for seed in seeds:
            config = method_config(method, seed=seed, steps=steps, data_dir=data_dir)
            workdir = os.path.join(
                out, "runs", method, f"steps{config.num_train_steps}_seed{seed}"
            )
            start = time.perf_counter()
            try:
                results = train.train_and_evaluate(config, workdir)
            except train.NonFiniteLossError as e:  # one diverged run: go on
                results, error = None, str(e)
            seconds = time.perf_counter() - start
            done += 1
            if results is None:
                r = {m: float("nan") for m in METRICS}
                r["error"] = error
                log(f"[{done}/{total}] {method} seed {seed}: diverged ({error})")
            else:
                r = {
                    "verification_accuracy": results["verification_accuracy"],
                    "recall_at_1": results["recall_at_k"]["recall@1"],
                    "nmi": results["nmi"],
                }
                log(
                    f"[{done}/{total}] {method} seed {seed}: verification "
                    f"{r['verification_accuracy']:.4f}, Recall@1 "
                    f"{r['recall_at_1']:.4f}, NMI {r['nmi']:.4f} ({seconds:.0f} s)"
                )
            r.update(seconds=seconds, steps=int(config.num_train_steps))
            runs[method][str(seed)] = r
            finished = {m: v for m, v in runs.items() if v}
            summary = _summary(finished)
            record = {"steps": steps, "seeds": list(seeds), "runs": finished}
            record["summary"] = summary
            with open(os.path.join(out, "compare.json"), "w") as f:
                json.dump(record, f, indent=2)
            table = markdown_table(summary, steps=steps or "default", seeds=list(seeds))
            with open(os.path.join(out, "compare.md"), "w") as f:
                f.write(table)
    log(table)
    return record


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO.
    compare(
        _METHODS.value,
        [int(s) for s in _SEEDS.value],
        _OUT.value,
        steps=_STEPS.value,
        data_dir=_DATA_DIR.value,
        log=lambda line: print(line, flush=True),
    )


def main():
    flags.mark_flag_as_required("out")
    app.run(_main)


if __name__ == "__main__":
    main()
