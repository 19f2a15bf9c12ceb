"""DIR/eval.json, DIR/report.md and PNG plots from the evaluation results."""

from __future__ import annotations

import json
import os

import numpy as np


def _plot_embeddings(path, embeddings, labels):
    import matplotlib.pyplot as plt

    x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    x = x - x.mean(axis=0)
    # 2-D projection: the top two principal components.
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    xy = x @ vt[:2].T
    fig, ax = plt.subplots(figsize=(5, 5))
    for c in np.unique(labels):
        ax.scatter(*xy[labels == c].T, s=6, label=str(c))
    ax.set_title("Held-out embeddings (PCA of normalised)")
    ax.legend(title="class", markerscale=3)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _plot_training(path, metrics_path):
    import matplotlib.pyplot as plt

    with open(metrics_path) as f:
        records = [json.loads(line) for line in f]
    steps = [r["step"] for r in records]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(steps, [r["loss"] for r in records])
    a.set(xlabel="step", ylabel="loss", title="Training loss")
    b.plot(steps, [r["accuracy"] for r in records])
    b.set(xlabel="step", ylabel="accuracy", title="Training accuracy (closed set)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(workdir: str, results: dict, config) -> None:
    """Writes eval.json, report.md, embeddings.png, roc.png, training.png."""
    from margin_jax import eval as mj_eval

    arrays = results.pop("_arrays")
    with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump(results, f, indent=2)
    plots = {}
    if config.plots:
        import matplotlib

        matplotlib.use("Agg")
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
    tar = ", ".join(f"{v:.4f} @ FAR {k}" for k, v in results["tar_at_far"].items())
    recall = ", ".join(f"{k} {v:.4f}" for k, v in results["recall_at_k"].items())
    lines = [
        f"# Open-set evaluation: {config.loss.name} on {config.dataset}",
        "",
        f"Trained {config.num_train_steps} steps on classes 0..."
        f"{config.num_train_classes - 1} (sorted); evaluated on held-out classes "
        f"{results['held_out_classes']} ({results['num_held_out_images']} images,"
        f" {results['num_pairs']} pairs).",
        "",
        "| metric | value |",
        "|---|---|",
        f"| verification accuracy (10-fold) | {results['verification_accuracy']:.4f}"
        f" ± {results['verification_accuracy_std']:.4f} |",
        f"| VAL@FAR=1e-3 | {results['val_at_far_1e-3']:.4f} |",
        f"| TAR@FAR | {tar} |",
        f"| ROC AUC | {results['roc_auc']:.4f} |",
        f"| Recall@K | {recall} |",
        f"| precision@1 | {results['precision_at_1']:.4f} |",
        f"| R-precision | {results['r_precision']:.4f} |",
        f"| MAP@R | {results['map_at_r']:.4f} |",
        f"| NMI | {results['nmi']:.4f} |",
        "",
    ]
    lines += [f"![{name}]({file})" for name, file in plots.items()]
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
