"""Flax NNX models: a small CNN backbone, an embedding head, a margin head.

The training code uses them functionally: ``nnx.split`` once into a graph
definition and the (params, batch_stats) state pytrees; the pure train step
calls ``nnx.merge`` inside and returns the new state (see `train.train`).

Every model maps images to the embeddings that are evaluated (``model(x)``);
`embed_and_classify` also gives the classifier logits of the two-head models
(Taha et al.), from the same forward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import margin_jax as mj
from train import iresnet

TWO_HEAD_MODELS = ("small_cnn_two_head",)
MODELS = ("small_cnn", *TWO_HEAD_MODELS, *iresnet.ARCHS)


class SmallCNN(nnx.Module):
    """Three 3x3 conv-BN-ReLU blocks (stride 1, 2, 2) for tiny images (8x8).

    ``dtype`` is the compute dtype (e.g. bfloat16); parameters stay float32 and
    the output features are float32, so the heads and the loss run in float32.
    """

    def __init__(
        self,
        in_channels: int,
        width: int,
        *,
        axis_name,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
    ):
        self.dtype = dtype
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
                    dtype=dtype,
                    rngs=rngs,
                )
            )
            self.norms.append(
                nnx.BatchNorm(
                    c_out, momentum=0.9, axis_name=axis_name, dtype=dtype, rngs=rngs
                )
            )
        self.out_channels = widths[-1]

    def flat_features(self, image_shape: tuple[int, int, int]) -> int:
        """Size of the flattened output for images [H, W, C]."""
        height, width, _ = image_shape
        # Two stride-2 convolutions with SAME padding: ceil(n / 4).
        return -(-height // 4) * -(-width // 4) * self.out_channels

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = nnx.relu(norm(conv(x)))
        return x.astype(jnp.float32)


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
        dtype=jnp.float32,
    ):
        self.backbone = SmallCNN(
            image_shape[-1], width, axis_name=axis_name, rngs=rngs, dtype=dtype
        )
        flat = self.backbone.flat_features(image_shape)
        self.embed = EmbeddingHead(flat, embedding_dim, axis_name=axis_name, rngs=rngs)
        self.head = MarginHead(num_classes, embedding_dim, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.embed(self.backbone(images))


class ClassifierHead(nnx.Module):
    """GAP -> FC(C) with bias: logits [B, C] from feature maps [B, H, W, F]."""

    def __init__(self, in_features: int, num_classes: int, *, rngs: nnx.Rngs):
        # W is [C, F] like MarginHead's, so fan-in is the last axis.
        init = nnx.initializers.lecun_normal(in_axis=-1, out_axis=-2)
        self.weight = nnx.Param(init(rngs.params(), (num_classes, in_features)))
        self.bias = nnx.Param(jnp.zeros((num_classes,)))

    def __call__(self, features: jax.Array) -> jax.Array:
        pooled = jnp.mean(features, axis=(1, 2))
        return pooled @ self.weight[...].T + self.bias[...]


class TwoHeadModel(nnx.Module):
    """SmallCNN with a classifier head and an embedding head (Taha et al. 2020).

    Classifier: GAP -> FC(C) (``head``). Embedding: flatten -> FC(D) ->
    L2-normalise (``embed``), the head a triplet loss ranks and the one that
    is evaluated: ``model(images)`` is the normalised embedding [B, D].
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        num_classes: int,
        *,
        width: int = 32,
        embedding_dim: int = 256,
        axis_name=None,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
    ):
        self.backbone = SmallCNN(
            image_shape[-1], width, axis_name=axis_name, rngs=rngs, dtype=dtype
        )
        flat = self.backbone.flat_features(image_shape)
        self.embed = nnx.Linear(flat, embedding_dim, rngs=rngs)
        self.head = ClassifierHead(self.backbone.out_channels, num_classes, rngs=rngs)

    def embed_and_classify(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(normalised embeddings [B, D], logits [B, C]), one backbone pass."""
        features = self.backbone(images)
        flat = features.reshape(features.shape[0], -1)
        return mj.l2_normalize(self.embed(flat)), self.head(features)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.embed_and_classify(images)[0]

    def classify(self, images: jax.Array) -> jax.Array:
        return self.embed_and_classify(images)[1]


def embed_and_classify(model, images: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """(embeddings [B, D], classifier logits [B, C] or None) in one forward pass.

    The logits are None for the one-head models, whose classifier is the
    margin head ``model.head.weight`` applied by the loss.
    """
    if isinstance(model, TwoHeadModel):
        return model.embed_and_classify(images)
    return model(images), None


def create_model(
    config, image_shape, num_classes: int, *, axis_name=None, seed: int = 0
) -> EmbeddingModel | TwoHeadModel | iresnet.IResNetModel:
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
    compute_dtype = config.get("compute_dtype", "float32")
    if compute_dtype not in iresnet.COMPUTE_DTYPES:
        raise ValueError(
            f"Unknown compute_dtype {compute_dtype!r}; valid choices for "
            f"config.compute_dtype: {', '.join(iresnet.COMPUTE_DTYPES)}."
        )
    model_cls = TwoHeadModel if config.model in TWO_HEAD_MODELS else EmbeddingModel
    return model_cls(
        tuple(image_shape),
        num_classes,
        width=config.width,
        embedding_dim=config.embedding_dim,
        axis_name=axis_name,
        rngs=nnx.Rngs(seed),
        dtype=iresnet.COMPUTE_DTYPES[compute_dtype],
    )
