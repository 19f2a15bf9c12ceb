"""Figures of notebooks/hypersphere.ipynb: 2-D and 3-D embeddings of the digits.

Every run goes through the pipeline (`train.train.train_and_evaluate` with the
family config of `train.compare.METHODS`; the embedding size and the step
count changed, and the few low-dimensional changes of `OVERRIDES`), is
evaluated on the held-out digits 7-9 like the main job, and is then restored
from its checkpoint to embed every image. Runs live in
``runs_dir()/<method>_d<dim>_<id>``, the id a hash of the config and of the
margin_jax and train/ sources, and are resumed: a second call with the same
arguments and code only re-embeds, any change retrains.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os

import numpy as np
from flax import nnx

import figures
from figures import _plot
from train import compare, evaluation, restore
from train import train as train_lib

# The methods drawn, in order (keys of train.compare.METHODS).
METHODS = (
    "softmax",
    "normface",
    "sphereface",
    "cosface",
    "arcface",
    "sv_softmax",
    "center_softmax",
    "softmax_triplet",
)
RUNS_ENV = "MARGIN_JAX_RUNS"
HELD_OUT_RADIUS = 0.72  # the inner ring of the 2-D panels


# Changes to the family configs for low-dimensional embeddings (shown in the
# labels). SV-Arc's m = 0.5 asks for 2m = 57° between neighbouring classes,
# 401° for 7 classes, more than the circle has; it gets the margin of the
# digits ArcFace config instead, so the two differ only by the SV stage.
OVERRIDES = {"sv_softmax": {"margin": 0.2}}


def runs_dir(name: str) -> str:
    """Where notebooks train: $MARGIN_JAX_RUNS/name, else ~/.cache/margin_jax/runs."""
    base = os.environ.get(RUNS_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "margin_jax", "runs"
    )
    return os.path.join(base, name)


@functools.cache
def _code_fingerprint() -> bytes:
    """The margin_jax and train/ sources and the library versions."""
    import flax
    import jax
    import optax

    import margin_jax
    import train

    digest = hashlib.sha1(
        f"{jax.__version__} {flax.__version__} {optax.__version__}".encode()
    )
    for package in (margin_jax, train):
        root = os.path.dirname(os.path.abspath(package.__file__))
        for folder, dirs, files in sorted(os.walk(root)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.digest()


def config_id(config) -> str:
    """A short hash of the config and the code: a change never resumes a run."""
    digest = hashlib.sha1(config.to_json(sort_keys=True).encode())
    digest.update(_code_fingerprint())
    return digest.hexdigest()[:10]


@dataclasses.dataclass
class Run:
    """One trained method: held-out results and the embeddings of every image."""

    method: str
    dim: int
    steps: int
    results: dict  # as eval.json: verification_accuracy, recall_at_k, nmi, ...
    train_accuracy: float  # closed-set accuracy of the last logged training step
    train_embeddings: np.ndarray  # [N, dim], digits 0-6
    train_labels: np.ndarray
    held_out_embeddings: np.ndarray  # [M, dim], digits 7-9 (never trained on)
    held_out_labels: np.ndarray
    centres: np.ndarray | None  # W [7, dim] when the head lives in embedding space
    diverged: str | None = None  # the NonFiniteLossError message, if it diverged

    @property
    def label(self) -> str:
        label = compare.METHODS[self.method][0]
        changed = OVERRIDES.get(self.method, {})
        if changed:
            label += " (" + ", ".join(f"{k} = {v}" for k, v in changed.items()) + ")"
        return label


def run_config(method: str, dim: int, *, steps: int, seed: int = 0):
    """The family config of ``method`` with ``dim``-D embeddings and ``steps``."""
    config = figures.short_config(method, steps=steps, every=steps, seed=seed)
    config.loss.update(OVERRIDES.get(method, {}))
    config.embedding_dim = dim
    return config


def train_run(method: str, dim: int, *, steps: int, seed: int = 0, workdir=None) -> Run:
    """Trains (or resumes) one method, evaluates it, embeds all digits."""
    config = run_config(method, dim, steps=steps, seed=seed)
    if workdir is None:
        workdir = os.path.join(
            runs_dir("hypersphere"), f"{method}_d{dim}_{config_id(config)}"
        )
    train_data, held_out = train_lib.load_data(config)
    try:
        results = train_lib.train_and_evaluate(config, workdir)
    except train_lib.NonFiniteLossError as e:
        empty = np.zeros((0, dim), np.float32)
        return Run(
            method,
            dim,
            steps,
            {},
            float("nan"),
            empty,
            empty[:, 0],
            empty,
            empty[:, 0],
            None,
            diverged=str(e),
        )
    results.pop("_arrays", None)
    model = restore.restore_model(config, workdir, train_data.images.shape[1:])
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    embed = lambda x: evaluation.embed(graphdef, params, stats, x)  # noqa: E731
    weight = np.asarray(model.head.weight[...])
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        train_accuracy = [json.loads(line) for line in f][-1]["accuracy"]
    return Run(
        method=method,
        dim=dim,
        steps=steps,
        results=results,
        train_accuracy=float(train_accuracy),
        train_embeddings=embed(train_data.images),
        train_labels=train_data.labels,
        held_out_embeddings=embed(held_out.images),
        held_out_labels=held_out.labels,
        centres=weight if weight.shape[-1] == dim else None,
    )


def train_all(
    methods=METHODS, dims=(2, 3), *, steps: int, seed: int = 0, progress=True
) -> dict[tuple[str, int], Run]:
    """`train_run` of every (method, dim), with a progress bar.

    A run whose loss diverges is kept as such (``run.diverged``; "diverged" in
    the table and its panel) and the others go on.
    """
    import tqdm

    jobs = [(m, d) for m in methods for d in dims]
    runs = {}
    for method, dim in tqdm.tqdm(jobs, desc="hypersphere runs", disable=not progress):
        runs[method, dim] = train_run(method, dim, steps=steps, seed=seed)
    return runs


def accuracy_table(runs: dict[tuple[str, int], Run]) -> str:
    """Markdown: held-out verification accuracy and Recall@1 per method and dim."""
    dims = sorted({d for _, d in runs})
    methods = list(dict.fromkeys(m for m, _ in runs))
    header = ["Method"]
    for d in dims:
        header += [f"{d}-D verification", f"{d}-D Recall@1", f"{d}-D train acc."]
    rows = []
    for m in methods:
        row = [runs[m, dims[0]].label]
        for d in dims:
            r = runs[m, d]
            if r.diverged:
                row += ["diverged"] * 3
                continue
            row += [
                f"{r.results['verification_accuracy']:.3f}",
                f"{r.results['recall_at_k']['recall@1']:.3f}",
                f"{r.train_accuracy:.3f}",
            ]
        rows.append(row)
    steps = {r.steps for r in runs.values()}
    note = (
        f"Held-out digits 7-9 (never trained on); {', '.join(map(str, steps))} "
        "training steps; train acc. is the closed-set accuracy of the last "
        "logged training batch (nearest class centre by cosine; the classifier "
        "head for the two-head model).\n\n"
    )
    return note + _plot.markdown_table(header, rows)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _points(run: Run):
    """(unit features, labels, is held out) of every digit, training ones last."""
    x = np.concatenate([_unit(run.held_out_embeddings), _unit(run.train_embeddings)])
    labels = np.concatenate([run.held_out_labels, run.train_labels])
    held = np.arange(len(labels)) < len(run.held_out_labels)
    return x, labels, held


def _circle(ax, run: Run, colors):
    t = np.linspace(0, 2 * np.pi, 361)
    ax.plot(np.cos(t), np.sin(t), color="0.85", lw=0.6)
    x, labels, held = _points(run)
    # Training digits on the unit circle, held-out ones on an inner ring.
    r = np.where(held, HELD_OUT_RADIUS, 1.0)[:, None]
    ax.scatter(
        *(r * x).T,
        s=np.where(held, 9, 7),
        c=[colors[y] for y in labels],
        marker="o",
        lw=0,
        alpha=0.6,
    )
    if run.centres is not None:
        for i, w in enumerate(_unit(run.centres)):
            ax.plot([0, 1.12 * w[0]], [0, 1.12 * w[1]], color=colors[i], lw=1.0)
    ax.set_aspect("equal")
    ax.set_xlim(-1.2, 1.2)
    ax.set_ylim(-1.2, 1.2)
    ax.axis("off")


def _sphere(ax, run: Run, colors):
    u, v = np.meshgrid(np.linspace(0, 2 * np.pi, 25), np.linspace(0, np.pi, 13))
    ax.plot_wireframe(
        np.cos(u) * np.sin(v), np.sin(u) * np.sin(v), np.cos(v), color="0.88", lw=0.4
    )
    x, labels, held = _points(run)
    ax.scatter(
        *x.T,
        s=np.where(held, 6, 4),
        c=[colors[y] for y in labels],
        lw=0,
        depthshade=True,
    )
    ax.set_box_aspect((1, 1, 1))
    ax.set_axis_off()


def plot_hypersphere(runs: dict[tuple[str, int], Run], *, columns: int = 2):
    """Each method's normalised features: circle (2-D) and sphere (3-D) side by side.

    One colour per digit. 2-D: training digits 0-6 on the unit circle, lines
    the directions of the class centres W (where the head lives in the
    embedding space), held-out digits 7-9 on an inner ring. Titles give the
    held-out verification accuracy.
    """
    methods = list(dict.fromkeys(m for m, _ in runs))
    rows = -(-len(methods) // columns)
    fig = _plot.new_figure((4.2 * columns, 2.3 * rows))
    grid = fig.add_gridspec(rows, 2 * columns)
    colors = _plot.class_colors(10)
    for k, method in enumerate(methods):
        r, c = divmod(k, columns)
        for j, dim in enumerate((2, 3)):
            if (method, dim) not in runs:
                continue
            run = runs[method, dim]
            kw = {"projection": "3d"} if dim == 3 else {}
            ax = fig.add_subplot(grid[r, 2 * c + j], **kw)
            (_circle if dim == 2 else _sphere)(ax, run, colors)
            score = (
                "diverged"
                if run.diverged
                else f"held-out ver. {run.results['verification_accuracy']:.3f}"
            )
            ax.set_title(f"{run.label}, {dim}-D\n{score}", fontsize=8)
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], ls="", marker="o", color=colors[d], label=str(d))
        for d in range(10)
    ]
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncol=10,
        title="digit (0-6 trained on, 7-9 held out)",
        fontsize=8,
    )
    return fig
