"""IResNet: shapes at 112x112 (abstract only), tiny real steps at 32x32."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from train import iresnet, models

TINY = dict(image_shape=(32, 32, 3), width_multiplier=0.125, embedding_dim=16)


def _count(state) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


def _insightface_param_count(layers, *, embedding_dim=512, spatial=7 * 7) -> int:
    """torch ``sum(p.numel() for p in iresnet.parameters())``, counted by hand."""
    count = 3 * 64 * 9 + 2 * 64 + 64  # stem conv, BN, PReLU
    c_in = 64
    for num_blocks, c_out in zip(layers, (64, 128, 256, 512), strict=True):
        for i in range(num_blocks):
            count += 2 * c_in + 9 * c_in * c_out + 2 * c_out + c_out
            count += 9 * c_out * c_out + 2 * c_out
            if i == 0:  # stride 2: conv1x1 + BN shortcut
                count += c_in * c_out + 2 * c_out
            c_in = c_out
    count += 2 * 512  # bn2
    count += spatial * 512 * embedding_dim + embedding_dim  # fc
    count += 2 * embedding_dim  # features (weight frozen at 1, still counted)
    return count


def _abstract(name, **kwargs):
    return nnx.eval_shape(
        lambda: iresnet.create_iresnet(name, rngs=nnx.Rngs(0), **kwargs)
    )


def _apply_abstract(model, method, shape, dtype=jnp.float32):
    graphdef, state = nnx.split(model)

    def fn(state, x):
        return getattr(nnx.merge(graphdef, state), method)(x)

    return jax.eval_shape(fn, state, jax.ShapeDtypeStruct(shape, dtype))


def test_shapes_at_112():
    model = _abstract("iresnet50")
    assert model.feature_shape == (7, 7, 512)
    assert model.fc.in_features == 7 * 7 * 512
    assert _apply_abstract(model, "feature_map", (2, 112, 112, 3)).shape == (
        2,
        7,
        7,
        512,
    )
    out = _apply_abstract(model, "__call__", (2, 112, 112, 3))
    assert out.shape == (2, 512) and out.dtype == jnp.float32


def test_iresnet50_parameter_count_matches_insightface():
    model = _abstract("iresnet50")
    count = _count(nnx.state(model, nnx.Param))
    # insightface's frozen BatchNorm1d weight is no parameter here.
    assert count == _insightface_param_count(iresnet.ARCHS["iresnet50"]) - 512
    assert abs(count - 43.6e6) / 43.6e6 < 0.01


def test_stage_widths_and_downsample_placement():
    model = _abstract("iresnet34", image_shape=(112, 112, 3), width_multiplier=0.5)
    assert model.feature_shape == (7, 7, 256)
    widths = (32, 64, 128, 256)
    for blocks, n, width in zip(model.stages, (3, 4, 6, 3), widths, strict=True):
        assert len(blocks) == n
        assert blocks[0].downsample is not None
        assert all(b.downsample is None for b in blocks[1:])
        assert all(b.conv2.out_features == width for b in blocks)


@pytest.mark.parametrize(
    "c_in, c_out, stride, downsample, out_shape",
    [
        (4, 4, 1, False, (2, 8, 8, 4)),
        (4, 8, 1, True, (2, 8, 8, 8)),
        (4, 4, 2, True, (2, 4, 4, 4)),
        (4, 8, 2, True, (2, 4, 4, 8)),
    ],
)
def test_basic_block_downsample_path(c_in, c_out, stride, downsample, out_shape):
    block = iresnet.IBasicBlock(c_in, c_out, stride=stride, rngs=nnx.Rngs(0))
    assert (block.downsample is not None) == downsample
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, c_in))
    y = block(x)
    assert y.shape == out_shape
    # With the residual branch's last BN zeroed the block is its shortcut.
    block.bn3.scale[...] = jnp.zeros_like(block.bn3.scale[...])
    shortcut = x if block.downsample is None else block.downsample(x)
    np.testing.assert_allclose(block(x), shortcut, atol=1e-6)


def test_odd_input_size_flatten():
    model = _abstract("iresnet18", image_shape=(30, 26, 3), width_multiplier=0.25)
    assert model.feature_shape == (2, 2, 128)  # ceil(30/16), ceil(26/16)
    assert _apply_abstract(model, "__call__", (3, 30, 26, 3)).shape == (3, 512)


@functools.cache
def _tiny_state():
    # Eager initialisation compiles one kernel per parameter shape (seconds on
    # a loaded CPU), so the tiny model's float32 state is built once; dtype,
    # axis name and dropout are static and change no parameter.
    return nnx.state(iresnet.IResNet((1, 1, 1, 1), rngs=nnx.Rngs(0), **TINY))


def _tiny_model(compute_dtype="float32", **kwargs):
    abstract = nnx.eval_shape(
        lambda: iresnet.IResNet(
            (1, 1, 1, 1),
            dtype=iresnet.COMPUTE_DTYPES[compute_dtype],
            rngs=nnx.Rngs(0),
            **TINY,
            **kwargs,
        )
    )
    graphdef, _ = nnx.split(abstract)
    model = nnx.merge(graphdef, _tiny_state(), copy=True)
    model.train()
    return model


def _loss_and_grads(model, images):
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    def loss_fn(params):
        model = nnx.merge(graphdef, params, batch_stats, copy=True)
        out = model(images)
        return jnp.mean(jnp.sum(out**2, axis=-1)), (
            out,
            nnx.state(model, nnx.BatchStat),
        )

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss, (out, stats)), grads = grad_fn(params)
    return loss, out, grads, stats


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_tiny_forward_backward(compute_dtype):
    model = _tiny_model(compute_dtype)
    images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    if compute_dtype == "bfloat16":
        assert _apply_abstract(model, "feature_map", images.shape).dtype == jnp.bfloat16
    loss, out, grads, new = _loss_and_grads(model, images)
    assert out.shape == (4, 16) and out.dtype == jnp.float32
    assert np.isfinite(loss)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(g.dtype == jnp.float32 for g in leaves)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert all(np.any(g != 0) for g in leaves)  # every parameter is used
    # Training mode updates the running statistics.
    old = nnx.state(model, nnx.BatchStat)
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), old, new)
    assert all(jax.tree.leaves(changed))
    # Eval mode uses them: per-example output, no batch dependence.
    model.eval()
    apply = nnx.jit(lambda model, x: model(x))
    np.testing.assert_allclose(
        apply(model, images), apply(model, images[::-1])[::-1], atol=1e-5
    )


def test_bf16_embeddings_close_to_float32():
    images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    apply = nnx.jit(lambda model, x: model(x))
    f32 = apply(_tiny_model("float32"), images)
    bf16 = apply(_tiny_model("bfloat16"), images)
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(bf16, f32, atol=0.15, rtol=0.1)


def test_batch_norm_statistics_over_pmap_axis_equal_global_batch():
    n = jax.local_device_count()
    images = jax.random.normal(jax.random.key(0), (2 * n, 32, 32, 3))
    single = _tiny_model()(images)
    model = _tiny_model(axis_name="d")
    graphdef, state = nnx.split(model)

    @functools.partial(jax.pmap, axis_name="d", in_axes=(None, 0))
    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    sharded = forward(state, images.reshape(n, 2, *images.shape[1:]))
    np.testing.assert_allclose(sharded.reshape(single.shape), single, atol=1e-4)


def test_dropout_needs_a_key_only_when_positive():
    model = _tiny_model(dropout=0.5)
    images = jnp.ones((2, 32, 32, 3))
    with pytest.raises(ValueError, match="rngs"):
        _apply_abstract(model, "__call__", images.shape)
    apply = nnx.jit(lambda model, x, key: model(x, rngs=key))
    a = apply(model, images, jax.random.key(1))
    b = apply(model, images, jax.random.key(2))
    assert not np.allclose(a, b)
    model.eval()
    np.testing.assert_allclose(apply(model, images, None), apply(model, images, None))


def test_create_model_registers_iresnets():
    assert set(iresnet.ARCHS) <= set(models.MODELS)
    config = ml_collections.ConfigDict(
        {
            "model": "iresnet18",
            "width": 32,
            "embedding_dim": 24,
            "width_multiplier": 0.25,
            "compute_dtype": "bfloat16",
        }
    )
    model = nnx.eval_shape(
        lambda: models.create_model(config, (32, 32, 3), 10, axis_name="batch")
    )
    assert model.head.weight.shape == (10, 24)
    assert model.backbone.dtype == jnp.bfloat16
    model.train()
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    def forward(params, batch_stats, x):
        return nnx.merge(graphdef, params, batch_stats)(x)

    out = jax.eval_shape(
        jax.vmap(forward, in_axes=(None, None, 0), axis_name="batch"),
        params,
        batch_stats,
        jax.ShapeDtypeStruct((1, 4, 32, 32, 3), jnp.float32),
    )
    assert out.shape == (1, 4, 24) and out.dtype == jnp.float32


def test_unknown_names_are_rejected_with_choices():
    with pytest.raises(ValueError, match="iresnet50"):
        iresnet.create_iresnet("iresnet51", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="bfloat16"):
        iresnet.create_iresnet("iresnet18", compute_dtype="fp16", rngs=nnx.Rngs(0))
