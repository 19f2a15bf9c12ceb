"""The embedded glyph data set at a glance (README gallery: glyphs.png)."""

from __future__ import annotations

import numpy as np

from figures import _plot


def plot_glyph_samples(*, num_classes: int = 8, seed: int = 0, jitter=None):
    """Rows of classes, one image per font file: what a class (identity) is.

    ``num_classes`` random characters of `train.glyphs_builder.render_glyphs`;
    the last column shows the first image after one draw of the training
    jitter (``jitter``: `train.input_pipeline.affine_matrices`'s arguments,
    default those of train/configs/default.py).
    """
    from train import glyphs_builder, input_pipeline
    from train.configs import default

    images, labels, names, fonts = glyphs_builder.render_glyphs()
    jitter = dict(jitter or default.get_config().random_affine)
    rng = np.random.default_rng(seed)
    classes = np.sort(rng.choice(len(names), num_classes, replace=False))
    columns = max(np.bincount(labels)[classes]) + 1
    fig = _plot.new_figure(figsize=(0.55 * columns, 0.62 * num_classes + 0.4))
    axes = fig.subplots(num_classes, columns, squeeze=False)
    for row, c in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        warped = input_pipeline.warp_affine(
            images[idx[:1]],
            input_pipeline.affine_matrices(seed, int(c), 1, **jitter),
        )
        shown = [*images[idx], *([None] * (columns - 1 - len(idx))), warped[0]]
        for col, (ax, image) in enumerate(zip(axes[row], shown, strict=True)):
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if image is not None:
                ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
            if col == columns - 1 and row == 0:
                ax.set_title("jittered", fontsize=7)
        axes[row, 0].set_ylabel(names[c], rotation=0, ha="right", va="center")
    fig.suptitle(
        f"margin_jax_glyphs: {len(names)} characters (classes), {len(labels)} "
        f"images of {images.shape[1]}x{images.shape[2]}, one per font file "
        f"({len(set(fonts))} fonts)",
        fontsize=9,
    )
    return fig
