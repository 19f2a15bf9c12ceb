"""DIR/eval.json, DIR/report.md and PNG plots from the evaluation results."""

from __future__ import annotations

import json
import os

import numpy as np

MAX_LEGEND_CLASSES = 10


def _plot_embeddings(path, embeddings, labels):
    import matplotlib.pyplot as plt

    x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    x = x - x.mean(axis=0)
    # 2-D projection: the top two principal components.
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    xy = x @ vt[:2].T
    classes = np.unique(labels)
    fig, ax = plt.subplots(figsize=(5, 5))
    if len(classes) <= MAX_LEGEND_CLASSES:
        for c in classes:
            ax.scatter(*xy[labels == c].T, s=6, label=str(c))
        ax.set_title("Held-out embeddings (PCA of normalised)")
        ax.legend(title="class", markerscale=3)
    else:  # too many for a legend: every class in grey, a few in colour
        shown = np.random.default_rng(0).choice(classes, MAX_LEGEND_CLASSES, False)
        ax.scatter(*xy.T, s=2, c="0.8")
        for c in np.sort(shown):
            ax.scatter(*xy[labels == c].T, s=10)
        ax.set_title(
            f"Held-out embeddings (PCA of normalised): {MAX_LEGEND_CLASSES} of "
            f"{len(classes)} classes in colour"
        )
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _plot_training(path, metrics_path):
    import matplotlib.pyplot as plt

    with open(metrics_path) as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val/mean_accuracy" in r]
    fig, axes = plt.subplots(1, 3 if val else 2, figsize=(13 if val else 9, 3.5))
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train])
    axes[0].set(xlabel="step", ylabel="loss", title="Training loss")
    axes[1].plot(steps, [r["accuracy"] for r in train])
    axes[1].set(
        xlabel="step", ylabel="accuracy", title="Training accuracy (closed set)"
    )
    if val:
        names = sorted(
            {k.split("/")[1] for r in val for k in r if k.endswith("/accuracy")}
        )
        for name in names:
            key = f"val/{name}/accuracy"
            points = [(r["step"], r[key]) for r in val if key in r]
            axes[2].plot(*zip(*points, strict=True), marker="o", label=name)
        axes[2].set(xlabel="step", ylabel="accuracy", title="Verification (10-fold)")
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _open_set_rows(r: dict) -> list[tuple[str, str]]:
    """(metric, formatted value) rows of one embedding's open-set results."""
    return [
        (
            "verification accuracy (10-fold)",
            f"{r['verification_accuracy']:.4f} ± {r['verification_accuracy_std']:.4f}",
        ),
        ("VAL@FAR=1e-3", f"{r['val_at_far_1e-3']:.4f}"),
        *((f"TAR@FAR={k}", f"{v:.4f}") for k, v in r["tar_at_far"].items()),
        ("ROC AUC", f"{r['roc_auc']:.4f}"),
        *(
            (k.replace("recall@", "Recall@"), f"{v:.4f}")
            for k, v in r["recall_at_k"].items()
        ),
        ("precision@1", f"{r['precision_at_1']:.4f}"),
        ("R-precision", f"{r['r_precision']:.4f}"),
        ("MAP@R", f"{r['map_at_r']:.4f}"),
        ("NMI", f"{r['nmi']:.4f}"),
    ]


# Column titles of the baselines (`train.evaluation.BASELINES`).
BASELINE_TITLES = {"untrained": "untrained network", "raw_pixels": "raw pixels"}


def _open_set_lines(results: dict, config) -> list[str]:
    baselines = results.get("baselines", {})
    names = [k for k in BASELINE_TITLES if k in baselines]
    columns = [results, *(baselines[k] for k in names)]
    titles = ["model", *(BASELINE_TITLES[k] for k in names)]
    rows = [_open_set_rows(r) for r in columns]
    lines = [
        f"Trained {config.num_train_steps} steps on classes 0..."
        f"{config.num_train_classes - 1}; evaluated on the "
        f"{len(results['held_out_classes'])} held-out classes "
        f"({results['num_held_out_images']} images, {results['num_pairs']} "
        "pairs), which the model never saw. Baselines on the same pairs and "
        "queries: the same network at initialisation, and the raw pixels "
        "(each image flattened and L2-normalised).",
        "",
        "| metric | " + " | ".join(titles) + " |",
        "|---|" + "---|" * len(titles),
    ]
    for i, (name, _) in enumerate(rows[0]):
        lines.append(f"| {name} | " + " | ".join(r[i][1] for r in rows) + " |")
    return [*lines, ""]


def _val_lines(results: dict, config) -> list[str]:
    lines = [
        "## Verification sets",
        "",
        f"At step {config.num_train_steps}, flip-fused embeddings, 10-fold "
        f"protocol; best = highest accuracy at any evaluation. The checkpoint "
        f"of the best mean accuracy ({results['best_step']}) is in best/.",
        "",
        "| target | accuracy | ± std | best | xnorm |",
        "|---|---|---|---|---|",
    ]
    for name, v in results["val_targets"].items():
        lines.append(
            f"| {name} | {v['accuracy']:.4f} | {v['accuracy_std']:.4f} | "
            f"{v['best']:.4f} | {v['xnorm']:.2f} |"
        )
    return [*lines, f"| mean | {results['val_mean_accuracy']:.4f} | | | |", ""]


def write_report(workdir: str, results: dict, config) -> None:
    """Writes eval.json, report.md and the plots (embeddings, roc, training)."""
    from margin_jax import eval as mj_eval

    arrays = results.pop("_arrays", None)
    with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump(results, f, indent=2)
    plots = {}
    if config.plots:
        import matplotlib

        matplotlib.use("Agg")
        if arrays is not None:
            plots["embeddings"] = "embeddings.png"
            _plot_embeddings(
                os.path.join(workdir, plots["embeddings"]),
                arrays["embeddings"],
                arrays["labels"],
            )
            plots["roc"] = "roc.png"
            fig = mj_eval.plot_roc(
                arrays["scores"],
                arrays["issame"],
                os.path.join(workdir, plots["roc"]),
                fars=(1e-2, 1e-1),
                label=config.loss.name,
                title="ROC, held-out identities",
            )
            matplotlib.pyplot.close(fig)
        metrics_path = os.path.join(workdir, "metrics.jsonl")
        if os.path.exists(metrics_path):
            plots["training"] = "training.png"
            _plot_training(os.path.join(workdir, plots["training"]), metrics_path)
    lines = [f"# Evaluation: {config.loss.name} on {config.dataset}", ""]
    if config.synthetic:
        lines += ["Trained on synthetic images (throughput run).", ""]
    if "verification_accuracy" in results:
        lines += ["## Open set (held-out identities)", ""]
        lines += _open_set_lines(results, config)
    if "val_targets" in results:
        lines += _val_lines(results, config)
    lines += [f"![{name}]({file})" for name, file in plots.items()]
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
