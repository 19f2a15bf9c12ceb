"""Flax NNX models: a small CNN backbone, an embedding head, a margin head.

The training code uses them functionally: ``nnx.split`` once into a graph
definition and the (params, batch_stats) state pytrees; the pure train step
calls ``nnx.merge`` inside and returns the new state (see `train.train`).
"""

from __future__ import annotations

import jax
from flax import nnx

from train import iresnet

MODELS = ("small_cnn", *iresnet.ARCHS)


class SmallCNN(nnx.Module):
    """Three 3x3 conv-BN-ReLU blocks (stride 1, 2, 2) for tiny images (8x8)."""

    def __init__(self, in_channels: int, width: int, *, axis_name, rngs: nnx.Rngs):
        widths = (width, 2 * width, 4 * width)
        self.convs = nnx.List()
        self.norms = nnx.List()
        for i, (c_in, c_out) in enumerate(
            zip((in_channels, *widths[:-1]), widths, strict=True)
        ):
            self.convs.append(
                nnx.Conv(
                    c_in,
                    c_out,
                    (3, 3),
                    strides=1 if i == 0 else 2,
                    use_bias=False,
                    rngs=rngs,
                )
            )
            self.norms.append(
                nnx.BatchNorm(c_out, momentum=0.9, axis_name=axis_name, rngs=rngs)
            )
        self.out_channels = widths[-1]

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = nnx.relu(norm(conv(x)))
        return x


class EmbeddingHead(nnx.Module):
    """Flatten -> Linear(D) -> BatchNorm, the insightface "E" output block."""

    def __init__(self, in_features: int, dim: int, *, axis_name, rngs: nnx.Rngs):
        self.linear = nnx.Linear(in_features, dim, use_bias=False, rngs=rngs)
        self.norm = nnx.BatchNorm(dim, momentum=0.9, axis_name=axis_name, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.linear(x.reshape(x.shape[0], -1)))


class MarginHead(nnx.Module):
    """The class centres W [C, D] of a margin softmax (no bias)."""

    def __init__(self, num_classes: int, dim: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(stddev=0.01)
        self.weight = nnx.Param(init(rngs.params(), (num_classes, dim)))


class EmbeddingModel(nnx.Module):
    """Backbone + embedding head; ``head`` holds W for the loss.

    ``model(images)`` gives the (unnormalised) embeddings [B, D]; the loss
    takes them with ``model.head.weight`` (the margin losses normalise both).
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        num_classes: int,
        *,
        width: int = 32,
        embedding_dim: int = 64,
        axis_name=None,
        rngs: nnx.Rngs,
    ):
        height, width_px, channels = image_shape
        self.backbone = SmallCNN(channels, width, axis_name=axis_name, rngs=rngs)
        # Two stride-2 convolutions with SAME padding: ceil(n / 4).
        flat = -(-height // 4) * -(-width_px // 4) * self.backbone.out_channels
        self.embed = EmbeddingHead(flat, embedding_dim, axis_name=axis_name, rngs=rngs)
        self.head = MarginHead(num_classes, embedding_dim, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.embed(self.backbone(images))


def create_model(
    config, image_shape, num_classes: int, *, axis_name=None, seed: int = 0
) -> EmbeddingModel | iresnet.IResNetModel:
    """The model named by ``config.model`` (see `MODELS`)."""
    if config.model not in MODELS:
        raise ValueError(
            f"Unknown model {config.model!r}; valid choices for config.model: "
            f"{', '.join(MODELS)}."
        )
    if config.model in iresnet.ARCHS:
        rngs = nnx.Rngs(seed)
        backbone = iresnet.create_iresnet(
            config.model,
            image_shape,
            width_multiplier=config.get("width_multiplier", 1.0),
            embedding_dim=config.embedding_dim,
            dropout=config.get("dropout", 0.0),
            compute_dtype=config.get("compute_dtype", "float32"),
            axis_name=axis_name,
            rngs=rngs,
        )
        head = MarginHead(num_classes, config.embedding_dim, rngs=rngs)
        return iresnet.IResNetModel(backbone, head)
    return EmbeddingModel(
        tuple(image_shape),
        num_classes,
        width=config.width,
        embedding_dim=config.embedding_dim,
        axis_name=axis_name,
        rngs=nnx.Rngs(seed),
    )
