"""IResNet, insightface's face-recognition ResNet (ArcFace), in Flax NNX (NHWC).

The network of insightface's ``arcface_torch/backbones/iresnet.py``: a 3x3
stride-1 stem (conv-BN-PReLU), four stages of pre-activation `IBasicBlock` s
(64, 128, 256, 512 channels, each stage opening with stride 2), then the "E"
output block BN -> dropout -> flatten -> Linear(D) -> BatchNorm1d. A 112x112
face gives a 7x7x512 map before the flatten and a 512-d embedding.

Differences from insightface, all deliberate:

* NHWC, so the flatten runs over (H, W, C), not PyTorch's (C, H, W): porting
  the ``fc`` weight of a PyTorch checkpoint needs a transpose of its input axis.
* The embedding BatchNorm has no scale parameter; insightface keeps its weight
  at 1 with ``requires_grad=False``, the same function (512 fewer parameters).
* ``width_multiplier`` and any input size (the flatten size follows it), so
  tests and smoke runs can use e.g. 32x32 images at a quarter of the width.
* Dropout takes its key at call time (``rngs=``), so the model holds no RNG
  state and splits into exactly (params, batch_stats); at the default rate 0
  it is the identity and needs none.

With ``dtype=jnp.bfloat16`` the convolutions, batch norms and PReLUs compute
in bfloat16 while every parameter stays float32 (batch statistics are always
reduced in float32 by Flax); the flatten output is cast back to float32 before
the Linear + BatchNorm1d, as insightface's ``fp16`` mode does, so the
embeddings are float32.

References:
  Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face
  Recognition", CVPR 2019, https://arxiv.org/abs/1801.07698.
  Duta et al., "Improved Residual Networks for Image and Video Recognition",
  ICPR 2020, https://arxiv.org/abs/2004.04989.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

ARCHS = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
}
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
STAGE_WIDTHS = (64, 128, 256, 512)

# insightface initialises every conv with N(0, 0.1) (not He): behind a BN the
# scale of a conv kernel only sets its effective learning rate under weight
# decay, so their lr 0.1 / wd 5e-4 recipe assumes this init.
_CONV_INIT = nnx.initializers.normal(stddev=0.1)
_BN_MOMENTUM = 0.9  # PyTorch's momentum 0.1


def _conv(c_in, c_out, kernel, stride, *, dtype, rngs):
    # Explicit symmetric padding as PyTorch's padding=k//2; "SAME" pads a
    # stride-2 conv on an even size at the bottom/right only.
    pad = kernel // 2
    return nnx.Conv(
        c_in,
        c_out,
        (kernel, kernel),
        strides=stride,
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=_CONV_INIT,
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def _norm(features, *, dtype, axis_name, rngs, use_scale=True):
    return nnx.BatchNorm(
        features,
        momentum=_BN_MOMENTUM,
        epsilon=1e-5,
        use_scale=use_scale,
        dtype=dtype,
        param_dtype=jnp.float32,
        axis_name=axis_name,
        rngs=rngs,
    )


class PReLU(nnx.Module):
    """Per-channel PReLU, slope initialised to 0.25 (``torch.nn.PReLU(C)``).

    ``nnx.PReLU`` has a single slope shared by all channels.
    """

    def __init__(self, channels: int):
        self.slope = nnx.Param(jnp.full((channels,), 0.25, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.where(x >= 0, x, self.slope[...].astype(x.dtype) * x)


class IBasicBlock(nnx.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus the shortcut.

    The shortcut is the identity, or conv1x1(stride) -> BN (``downsample``)
    when the stride or the channel count changes.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        *,
        stride: int = 1,
        dtype=jnp.float32,
        axis_name=None,
        rngs: nnx.Rngs,
    ):
        norm = dict(dtype=dtype, axis_name=axis_name, rngs=rngs)
        self.bn1 = _norm(c_in, **norm)
        self.conv1 = _conv(c_in, c_out, 3, 1, dtype=dtype, rngs=rngs)
        self.bn2 = _norm(c_out, **norm)
        self.prelu = PReLU(c_out)
        self.conv2 = _conv(c_out, c_out, 3, stride, dtype=dtype, rngs=rngs)
        self.bn3 = _norm(c_out, **norm)
        self.downsample = nnx.data(None)
        if stride != 1 or c_in != c_out:
            self.downsample = nnx.Sequential(
                _conv(c_in, c_out, 1, stride, dtype=dtype, rngs=rngs),
                _norm(c_out, **norm),
            )

    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.conv1(self.bn1(x))
        out = self.conv2(self.prelu(self.bn2(out)))
        out = self.bn3(out)
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nnx.Module):
    """IResNet with the "E" output block: images [B, H, W, C] -> embeddings [B, D].

    Args:
      layers: blocks per stage, e.g. ``ARCHS["iresnet50"]`` = (3, 4, 14, 3).
      image_shape: (H, W, C) of the input; H and W set the flatten size
        ceil(H / 16) x ceil(W / 16) x 512 (7x7x512 at 112x112).
      width_multiplier: scales the stage widths 64, 128, 256, 512.
      embedding_dim: D.
      dropout: rate of the dropout before the Linear (0 in insightface); a
        positive rate needs ``rngs=`` at call time in training mode.
      dtype: compute dtype of the convolutional body (parameters float32).
      axis_name: the pmap/shard_map axis batch statistics are reduced over.
    """

    def __init__(
        self,
        layers: Sequence[int],
        *,
        image_shape: Sequence[int] = (112, 112, 3),
        width_multiplier: float = 1.0,
        embedding_dim: int = 512,
        dropout: float = 0.0,
        dtype=jnp.float32,
        axis_name=None,
        rngs: nnx.Rngs,
    ):
        height, width, channels = image_shape
        widths = [max(1, round(w * width_multiplier)) for w in STAGE_WIDTHS]
        norm = dict(dtype=dtype, axis_name=axis_name, rngs=rngs)
        self.dtype = dtype
        self.conv1 = _conv(channels, widths[0], 3, 1, dtype=dtype, rngs=rngs)
        self.bn1 = _norm(widths[0], **norm)
        self.prelu = PReLU(widths[0])
        self.stages = nnx.List()
        c_in = widths[0]
        for num_blocks, c_out in zip(layers, widths, strict=True):
            blocks = nnx.List()
            for i in range(num_blocks):
                blocks.append(
                    IBasicBlock(c_in, c_out, stride=2 if i == 0 else 1, **norm)
                )
                c_in = c_out
            self.stages.append(blocks)
            # 3x3 stride-2 conv with padding 1: ceil(n / 2).
            height, width = -(-height // 2), -(-width // 2)
        self.bn2 = _norm(c_in, **norm)
        self.dropout = nnx.Dropout(dropout)
        self.feature_shape = (height, width, c_in)
        self.fc = nnx.Linear(height * width * c_in, embedding_dim, rngs=rngs)
        self.features = _norm(
            embedding_dim,
            dtype=jnp.float32,
            axis_name=axis_name,
            rngs=rngs,
            use_scale=False,
        )

    def feature_map(self, images: jax.Array) -> jax.Array:
        """The map [B, H/16, W/16, 512·width_multiplier] before the flatten."""
        x = self.prelu(self.bn1(self.conv1(images.astype(self.dtype))))
        for blocks in self.stages:
            for block in blocks:
                x = block(x)
        return self.bn2(x)

    def __call__(self, images: jax.Array, *, rngs=None) -> jax.Array:
        x = self.dropout(self.feature_map(images), rngs=rngs)
        x = x.reshape(x.shape[0], -1).astype(jnp.float32)
        return self.features(self.fc(x))


def create_iresnet(
    name: str,
    image_shape: Sequence[int] = (112, 112, 3),
    *,
    width_multiplier: float = 1.0,
    embedding_dim: int = 512,
    dropout: float = 0.0,
    compute_dtype: str = "float32",
    axis_name=None,
    rngs: nnx.Rngs,
) -> IResNet:
    """The IResNet named ``name`` (a key of `ARCHS`), compute dtype by name."""
    if name not in ARCHS:
        raise ValueError(
            f"Unknown IResNet {name!r}; valid choices: {', '.join(ARCHS)}."
        )
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"Unknown compute_dtype {compute_dtype!r}; valid choices: "
            f"{', '.join(COMPUTE_DTYPES)}."
        )
    return IResNet(
        ARCHS[name],
        image_shape=tuple(image_shape),
        width_multiplier=width_multiplier,
        embedding_dim=embedding_dim,
        dropout=dropout,
        dtype=COMPUTE_DTYPES[compute_dtype],
        axis_name=axis_name,
        rngs=rngs,
    )


class IResNetModel(nnx.Module):
    """An IResNet backbone and a classifier head holding W [C, D].

    The interface of `train.models.EmbeddingModel`: ``model(images)`` gives the
    embeddings [B, D] (float32), ``model.head.weight`` the class centres.
    """

    def __init__(self, backbone: IResNet, head: nnx.Module):
        self.backbone = backbone
        self.head = head

    def __call__(self, images: jax.Array, *, rngs=None) -> jax.Array:
        return self.backbone(images, rngs=rngs)
