"""The losses side by side: python -m train.compare --seeds 0,1,2 --out DIR.

Trains every method of `METHODS` on the glyphs default (small CNN, 1,300
training characters, the default optimiser and step budget; ``--base digits``
for scikit-learn's digits, ``--steps`` overrides the number of steps for all
of them) once per seed, evaluates on the held-out classes and writes
DIR/compare.md (mean ± sample std over the seeds of the held-out
verification accuracy, Recall@1 and NMI, with the raw-pixel and untrained
baselines as rows and which differences exceed the seed spread) and
DIR/compare.json (every run and the summary). Each run trains in
DIR/runs/<method>/steps<N>_seed<S> and resumes there, so an interrupted
comparison picks up where it stopped (a run with an eval.json is finished
and its results are read back; delete the run's folder to redo it).

Every method uses its family config (train/configs/<name>.py, the base's tuned
hyperparameters of that loss); the softmax + triplet regulariser is the
two-head version of the same backbone and needs P x K batches (see
train/configs/softmax_triplet.py).
"""

from __future__ import annotations

import importlib
import json
import os
import time

import numpy as np
from absl import app, flags, logging

from train import losses_table

# name -> (label in the table, config module under train/configs)
METHODS = {
    "softmax": ("Softmax", "softmax"),
    "normface": ("NormFace", "normface"),
    "sphereface": ("SphereFace (A-Softmax)", "sphereface"),
    "cosface": ("CosFace", "cosface"),
    "arcface": ("ArcFace", "arcface"),
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
_BASE = flags.DEFINE_enum(
    "base", "default", ["default", "digits"], "Base config: glyphs or digits."
)
# The baselines' rows, from the eval.json of this method's runs (the network
# at initialisation is its backbone; raw pixels are the same for every method).
BASELINE_METHOD = "arcface"
BASELINE_LABELS = {
    "raw_pixels": "Raw pixels (no model)",
    "untrained": "Untrained network",
}


def method_config(
    method: str, *, seed: int, steps: int | None, data_dir=None, base="default"
):
    """The config of one run: the family config on ``base``, seeded, quiet, no
    plots."""
    if method not in METHODS:
        raise ValueError(
            f"Unknown method {method!r}; valid choices: {', '.join(METHODS)}."
        )
    module = importlib.import_module(f"train.configs.{METHODS[method][1]}")
    config = module.get_config(base)
    config.seed = seed
    if steps is not None:
        config.num_train_steps = steps
    if data_dir is not None:
        config.data_dir = data_dir
    config.progress_bar = False
    config.tensorboard = False
    config.plots = False
    return config


def _metrics(results: dict) -> dict:
    return {
        "verification_accuracy": results["verification_accuracy"],
        "recall_at_1": results["recall_at_k"]["recall@1"],
        "nmi": results["nmi"],
    }


def _mean_std(values) -> dict:
    # A diverged run is NaN and makes the mean NaN: it is not hidden.
    values = np.asarray(values, np.float64)
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    return {"mean": float(values.mean()), "std": float(std), "n": len(values)}


def _summary(runs: dict) -> dict:
    return {
        method: {m: _mean_std([r[m] for r in by_seed.values()]) for m in METRICS}
        for method, by_seed in runs.items()
    }


def _baseline_summary(runs: dict) -> dict:
    """{baseline: {metric: mean/std}} over the seeds of `BASELINE_METHOD`
    (or of the first method run)."""
    method = BASELINE_METHOD if BASELINE_METHOD in runs else next(iter(runs), None)
    by_seed = [
        r["baselines"] for r in runs.get(method, {}).values() if "baselines" in r
    ]
    if not by_seed:
        return {}
    return {
        name: {m: _mean_std([b[name][m] for b in by_seed]) for m in METRICS}
        for name in BASELINE_LABELS
    }


def separated(a: dict, b: dict) -> bool:
    """True when two mean ± std differ by more than the sum of their stds
    (the seed spread), i.e. the ±1 std intervals do not overlap."""
    return abs(a["mean"] - b["mean"]) > a["std"] + b["std"]


def spread_sentence(summary: dict, baselines: dict, metric="verification_accuracy"):
    """Which differences of ``metric`` exceed the seed spread, in words."""
    if not summary:
        return ""
    title = METRICS[metric]
    ranked = sorted(summary, key=lambda m: -summary[m][metric]["mean"])
    best = ranked[0]
    tied = [
        m
        for m in ranked[1:]
        if not separated(summary[best][metric], summary[m][metric])
    ]
    lines = [
        f"{title}: the best mean is {METHODS[best][0]}"
        + (
            f"; {', '.join(METHODS[m][0] for m in tied)} "
            f"{'is' if len(tied) == 1 else 'are'} within the seed spread of it"
            if tied
            else ", ahead of every other method by more than the seed spread"
        )
        + " (|Δmean| <= std₁ + std₂ counts as within)."
    ]
    for name, values in baselines.items():
        above = [m for m in summary if separated(summary[m][metric], values[metric])]
        above = [
            m for m in above if summary[m][metric]["mean"] > values[metric]["mean"]
        ]
        baseline = BASELINE_LABELS[name].lower()
        lines.append(
            f"{len(above)} of {len(summary)} methods beat {baseline}"
            f" ({values[metric]['mean']:.4f}) by more than the seed spread."
        )
    return " ".join(lines)


def _data_title(base: str) -> str:
    if base == "digits":
        return "Held-out digits 7-9 (never trained on)"
    from train import glyphs_builder

    held = glyphs_builder.NUM_CLASSES - 1300
    return f"Held-out glyphs: {held} characters never trained on (1,300 train)"


def markdown_table(summary: dict, *, steps, seeds, baselines=None, base="default"):
    """The comparison as a markdown table (mean ± sample std over seeds), the
    baselines as the last rows, then which differences exceed the spread."""
    header = ["Method", "Loss (config.loss)", *METRICS.values()]
    lines = [
        f"{_data_title(base)}, {steps} steps, seeds "
        f"{', '.join(map(str, seeds))}: mean ± sample std over the seeds.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]

    def cells(metrics):
        return [f"{metrics[m]['mean']:.4f} ± {metrics[m]['std']:.4f}" for m in METRICS]

    for method, metrics in summary.items():
        config = method_config(method, seed=0, steps=None, base=base)
        name, loss = losses_table.config_loss(config.loss)
        hyper = ", ".join(f"{k}={v}" for k, v in loss.items())
        loss_cell = f"`{name}`" + (f" ({hyper})" if hyper else "")
        lines.append(
            f"| {METHODS[method][0]} | {loss_cell} | "
            + " | ".join(cells(metrics))
            + " |"
        )
    for name, metrics in (baselines or {}).items():
        lines.append(
            f"| {BASELINE_LABELS[name]} | (baseline) | "
            + " | ".join(cells(metrics))
            + " |"
        )
    sentence = "\n\n".join(
        spread_sentence(summary, baselines or {}, metric)
        for metric in ("verification_accuracy", "recall_at_1")
    )
    return "\n".join(lines) + "\n" + (f"\n{sentence}\n" if sentence else "")


def compare(
    methods, seeds, out: str, *, steps=None, data_dir=None, base="default", log=print
):
    """Trains and evaluates every (method, seed); writes the table and JSON.

    Returns:
      The JSON-ready dict written to ``out``/compare.json.
    """
    from train import train  # after absl has parsed the flags (jax config)

    for method in methods:
        method_config(method, seed=0, steps=steps, base=base)  # fail at once
    os.makedirs(out, exist_ok=True)
    runs: dict = {m: {} for m in methods}
    total, done = len(methods) * len(seeds), 0
    record = {}
    for method in methods:
        for seed in seeds:
            config = method_config(
                method, seed=seed, steps=steps, data_dir=data_dir, base=base
            )
            workdir = os.path.join(
                out, "runs", method, f"steps{config.num_train_steps}_seed{seed}"
            )
            start = time.perf_counter()
            eval_file = os.path.join(workdir, "eval.json")
            try:
                if os.path.exists(eval_file):  # done before: its results
                    with open(eval_file) as f:
                        results = json.load(f)
                else:
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
                r = _metrics(results)
                r["baselines"] = {
                    k: _metrics(v) for k, v in results.get("baselines", {}).items()
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
            baselines = _baseline_summary(finished)
            record = {"base": base, "steps": steps, "seeds": list(seeds)}
            record.update(runs=finished, summary=summary, baselines=baselines)
            with open(os.path.join(out, "compare.json"), "w") as f:
                json.dump(record, f, indent=2)
            table = markdown_table(
                summary,
                steps=steps or config.num_train_steps,
                seeds=list(seeds),
                baselines=baselines,
                base=base,
            )
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
        base=_BASE.value,
        log=lambda line: print(line, flush=True),
    )


def main():
    flags.mark_flag_as_required("out")
    app.run(_main)


if __name__ == "__main__":
    main()
