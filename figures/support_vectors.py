"""Figures of notebooks/support_vectors.ipynb: the SV mask on a real batch.

SV-Arc-Softmax (train/configs/sv_softmax.py: s = 16, ArcFace m = 0.5, t = 1.2)
is trained through the pipeline with a checkpoint every few steps. For a fixed
batch of real training digits, each checkpoint's cosines give the support
vectors `margin_jax.support_vector_mask` selects; at one checkpoint the
gradients of SV-Softmax, focal and hard-mining softmax on the same cosines show
how each reweights the non-target classes.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

import figures
import margin_jax as mj
from figures import _plot
from figures.hypersphere import config_id, runs_dir
from train import input_pipeline, losses_table, restore
from train import train as train_lib


@dataclasses.dataclass
class Snapshot:
    """The cosines of the fixed batch and of all training images at one step."""

    step: int
    cos: np.ndarray  # [B, C] of the fixed batch
    labels: np.ndarray  # [B]
    sv_fraction: float  # support vectors / non-target entries, all training images


def sv_config(*, steps: int, every: int, seed: int = 0):
    """train/configs/sv_softmax.py with a checkpoint every ``every`` steps, all kept."""
    return figures.short_config("sv_softmax", steps=steps, every=every, seed=seed)


def fixed_batch(data: input_pipeline.Dataset, *, per_class: int = 3, seed: int = 0):
    """``per_class`` random training images of each class, sorted by label."""
    rng = np.random.default_rng(seed)
    idx = np.concatenate(
        [
            rng.choice(np.flatnonzero(data.labels == c), per_class, replace=False)
            for c in np.unique(data.labels)
        ]
    )
    return input_pipeline.Dataset(data.images[idx], data.labels[idx])


def _target(cos, labels, margin):
    return mj.arcface_target(mj.take_target(cos, labels), margin=margin)


def support_vector_fraction(cos, labels, *, margin: float) -> float:
    """Share of the non-target entries that are support vectors."""
    mask = mj.support_vector_mask(cos, labels, _target(cos, labels, margin))
    return float(jnp.sum(mask)) / (cos.shape[0] * (cos.shape[1] - 1))


def train_snapshots(
    *, steps: int, every: int, at=None, seed: int = 0, workdir=None
) -> tuple[list[Snapshot], dict]:
    """Trains SV-Arc-Softmax; the fixed batch's cosines at steps ``at``.

    Returns (snapshots, the loss hyperparameters of the config). ``at``
    defaults to 0 and every checkpoint; each must be 0 or a multiple of
    ``every``.
    """
    config = sv_config(steps=steps, every=every, seed=seed)
    if workdir is None:
        workdir = os.path.join(runs_dir("support_vectors"), config_id(config))
    train_lib.train_and_evaluate(config, workdir)
    train_data, _ = train_lib.load_data(config)
    batch = fixed_batch(train_data, seed=seed)
    images = input_pipeline.preprocess(batch.images)
    everything = input_pipeline.preprocess(train_data.images)
    name, hyperparameters = losses_table.config_loss(config.loss)
    loss = {"name": name, **hyperparameters}
    margin = float(loss["margin"])
    snapshots = []
    for step in range(0, steps + 1, every) if at is None else at:
        model = restore.restore_model(
            config, workdir, train_data.images.shape[1:], step=step
        )
        weights = model.head.weight[...]
        cos = mj.cosine_logits(model(images), weights)
        cos_all = mj.cosine_logits(model(everything), weights)
        snapshots.append(
            Snapshot(
                step=step,
                cos=np.asarray(cos),
                labels=batch.labels,
                sv_fraction=support_vector_fraction(
                    cos_all, train_data.labels, margin=margin
                ),
            )
        )
    return snapshots, loss


def _mark(ax, labels, mask):
    rows, cols = np.nonzero(mask)
    ax.scatter(cols, rows, marker="x", s=22, color="k", lw=1.0)
    ax.scatter(
        labels,
        np.arange(len(labels)),
        marker="s",
        s=34,
        facecolor="none",
        lw=1.2,
        edgecolor="lime",
    )


def nearest(snapshots: list[Snapshot], fractions) -> list[Snapshot]:
    """The snapshots nearest to each fraction of the last step (no repeats)."""
    steps = np.array([s.step for s in snapshots])
    picks = [int(np.argmin(np.abs(steps - f * steps[-1]))) for f in fractions]
    return [snapshots[i] for i in sorted(set(picks))]


def with_support_vectors(snapshots: list[Snapshot], fraction: float = 0.25):
    """The snapshot whose support-vector share is nearest ``fraction``."""
    return min(snapshots, key=lambda s: abs(s.sv_fraction - fraction))


def plot_support_vectors(
    snapshots: list[Snapshot], *, margin: float, at=(0.0, 0.1, 0.2, 0.4)
):
    """The fixed batch's cosines at a few snapshots, support vectors marked.

    Rows are the batch's images (sorted by digit), columns the 7 classes;
    colour is cos θ; green squares the target class; black crosses the support
    vectors c_k > f(c_y) (ArcFace f). Panels at the snapshots nearest the
    fractions ``at`` of training. The last panel: the share of non-target
    entries that are support vectors over the training set, every snapshot.
    """
    shown = nearest(snapshots, at)
    panels = len(shown)
    fig = _plot.new_figure((3.0 * panels + 4, 4.6))
    axes = fig.subplots(1, panels + 1, width_ratios=[1] * panels + [1.6])
    for ax, snap in zip(axes, shown, strict=False):
        target = _target(jnp.asarray(snap.cos), snap.labels, margin)
        mask = np.asarray(mj.support_vector_mask(snap.cos, snap.labels, target))
        mesh = ax.imshow(snap.cos, cmap="coolwarm", vmin=-1, vmax=1, aspect="auto")
        _mark(ax, snap.labels, mask)
        ax.set(
            title=f"step {snap.step}: {int(mask.sum())} support vectors",
            xlabel="class k",
            xticks=range(snap.cos.shape[1]),
        )
        ax.set_yticks(
            range(len(snap.labels)), [str(y) for y in snap.labels], fontsize=6
        )
    axes[0].set_ylabel("batch image (true digit)")
    fig.colorbar(mesh, ax=axes[panels - 1], label="cos θ_k", shrink=0.8)
    curve = axes[-1]
    curve.plot([s.step for s in snapshots], [s.sv_fraction for s in snapshots], "o-")
    curve.set(
        xlabel="training step",
        ylabel="support vectors / non-target entries",
        title="All training digits",
        ylim=(0, None),
    )
    return fig


def reweighting_losses(*, scale: float, margin: float, t: float = 1.2):
    """name -> per-example loss of cosines [B, C] (ArcFace target for all)."""
    target_fn = functools.partial(mj.arcface_target, margin=margin)
    logits = functools.partial(mj.margin_logits, target_fn=target_fn, scale=scale)
    return {
        "ArcFace (base)": lambda c, y: mj.arcface_loss(
            c, y, scale=scale, margin=margin
        ),
        f"SV-Arc-Softmax, t = {t}": lambda c, y: mj.sv_softmax_loss(
            c, y, scale=scale, t=t, margin_type="arcface", margin=margin
        ),
        "Focal, γ = 2\n(ArcFace logits)": lambda c, y: mj.focal_loss(
            logits(c, y), y, gamma=2.0
        ),
        "Hard mining, keep 50%\n(ArcFace logits)": lambda c, y: mj.hard_mining_loss(
            logits(c, y), y, keep_ratio=0.5
        ),
    }


def non_target_gradients(cos, labels, *, scale: float, margin: float) -> dict:
    """name -> ∂ℓ_i/∂c_ik [B, C] of each loss of `reweighting_losses`."""
    cos = jnp.asarray(cos, jnp.float32)
    return {
        name: np.asarray(jax.grad(lambda c, fn=fn: jnp.sum(fn(c, labels)))(cos))
        for name, fn in reweighting_losses(scale=scale, margin=margin).items()
    }


def plot_reweighting(snapshot: Snapshot, *, scale: float, margin: float):
    """SV vs focal vs hard mining: gradient on each non-target cosine / ArcFace's.

    Each heatmap is the ratio of the loss's ∂ℓ_i/∂c_ik to ArcFace's on the same
    cosines (1 = unchanged; crosses: support vectors). SV-Softmax shifts an
    example's gradient onto its support vectors (its easy classes get much
    less, examples without support vectors are unchanged); focal scales whole
    rows by how hard the example is; hard mining keeps or drops whole rows.
    Right: the ratios against c_k − f(c_y), support vectors where it is > 0.
    """
    cos, labels = jnp.asarray(snapshot.cos), snapshot.labels
    grads = non_target_gradients(cos, labels, scale=scale, margin=margin)
    base = grads.pop("ArcFace (base)")
    target = _target(cos, labels, margin)
    mask = np.asarray(mj.support_vector_mask(cos, labels, target))
    non_target = ~np.asarray(mj.target_mask(labels, cos.shape[1]))
    gap = np.asarray(cos - target[:, None])
    fig = _plot.new_figure((15, 4.8))
    axes = fig.subplots(1, len(grads) + 1, width_ratios=[1] * len(grads) + [1.8])
    from matplotlib.colors import LogNorm

    norm = LogNorm(vmin=1e-2, vmax=1e2)
    for i, (ax, (name, g)) in enumerate(zip(axes, grads.items(), strict=False)):
        ratio = np.where(
            non_target, np.abs(g) / np.maximum(np.abs(base), 1e-30), np.nan
        )
        shown = np.clip(ratio, 1e-2, 1e2)
        mesh = ax.imshow(shown, cmap="PuOr_r", norm=norm, aspect="auto")
        _mark(ax, labels, mask)
        ax.set(title=name, xlabel="class k", xticks=range(cos.shape[1]))
        ax.set_yticks(range(len(labels)), [str(y) for y in labels], fontsize=6)
        axes[-1].scatter(
            gap[non_target],
            shown[non_target],
            s=12,
            color=f"C{i}",
            label=name.replace("\n", " "),
            alpha=0.7,
        )
    fig.colorbar(mesh, ax=axes[len(grads) - 1], label="|∂ℓ/∂c_k| / ArcFace's")
    axes[0].set_ylabel(f"batch image (true digit), step {snapshot.step}")
    sc = axes[-1]
    sc.set_yscale("log")
    sc.axvline(0, color="0.4", ls="--", lw=0.9)
    sc.axhline(1, color="0.4", lw=0.6)
    sc.set(
        xlabel="c_k − f(c_y)  (> 0: support vector)",
        ylabel="ratio (clipped to [0.01, 100])",
        title="Non-target gradient relative to ArcFace",
    )
    sc.legend(fontsize=7.5)
    return fig
