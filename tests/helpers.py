"""Shared test inputs for the margin-softmax tests."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

import margin_jax as mj

# Target angles that include θ = 0, both sides of π - m for m in {0.35, 0.5}, and π.
GRID_ANGLES = np.array(
    [
        0.0,
        0.05,
        0.4,
        1.0,
        1.5,
        np.pi / 2,
        2.0,
        2.6,
        2.62,
        2.64,
        2.66,
        2.76,
        2.79,
        2.8,
        3.0,
        np.pi - 1e-3,
        np.pi,
    ]
)


def grid_inputs(num_classes: int = 7, seed: int = 0):
    """cos [B, C] with target angles on GRID_ANGLES and random non-targets.

    Some non-target cosines exceed the target so support-vector masks are active.
    """
    rng = np.random.default_rng(seed)
    batch = len(GRID_ANGLES)
    cos = rng.uniform(-1.0, 1.0, (batch, num_classes))
    labels = rng.integers(0, num_classes, batch)
    cos[np.arange(batch), labels] = np.cos(GRID_ANGLES)
    return jnp.asarray(cos, jnp.float32), jnp.asarray(labels, jnp.int32)


def random_inputs(batch: int = 6, num_classes: int = 9, seed: int = 0, lo=-0.9, hi=0.9):
    rng = np.random.default_rng(seed)
    cos = rng.uniform(lo, hi, (batch, num_classes))
    labels = rng.integers(0, num_classes, batch)
    return jnp.asarray(cos, jnp.float32), jnp.asarray(labels, jnp.int32)


# Every loss of the family as a function (cos, labels, where) -> [B], with its
# default hyperparameters (or the required ones), for the generic tests.
def _curricular(cos, labels, where=None):
    return mj.curricularface_loss(cos, labels, mj.init_curricular_state(), where=where)[
        0
    ]


LOSSES = {
    "normface": mj.normface_loss,
    "cosface": mj.cosface_loss,
    "arcface": mj.arcface_loss,
    "arcface_easy": functools.partial(mj.arcface_loss, easy_margin=True),
    "arcface_st": functools.partial(mj.arcface_loss, straight_through=True),
    "combined": mj.combined_margin_loss,
    "combined_m1_2": functools.partial(mj.combined_margin_loss, m1=2.0, m2=0.1, m3=0.1),
    "combined_m1_1.5": functools.partial(
        mj.combined_margin_loss, m1=1.5, m2=0.1, m3=0.1
    ),
    "sphereface": functools.partial(mj.sphereface_loss, lambda_=5.0),
    "sphereface_orig": lambda c, y, where=None: mj.sphereface_loss(
        c, y, feature_norm=jnp.linspace(1.0, 9.0, c.shape[0]), where=where
    ),
    "adacos": lambda c, y, where=None: mj.adacos_loss(
        c, y, scale=mj.adacos_fixed_scale(max(np.shape(c)[-1], 3)), where=where
    ),
    "focal": mj.focal_loss,
    "hard_mining": mj.hard_mining_loss,
    "sv": mj.sv_softmax_loss,
    "sv_am": functools.partial(mj.sv_softmax_loss, margin_type="cosface", margin=0.35),
    "sv_arc": functools.partial(mj.sv_softmax_loss, margin_type="arcface", margin=0.5),
    "mv_am": mj.mv_softmax_loss,
    "mv_arc_fixed": functools.partial(
        mj.mv_softmax_loss, margin_type="arcface", margin=0.5, mode="fixed"
    ),
    "eqm": functools.partial(mj.eqm_loss, scale=64.0, t1=0.6, t2=0.25),
    "curricularface": _curricular,
    "softmax": mj.softmax_loss,
}


# Every preset as a `margin_jax.Stages`, for the chunked and sharded forms, which
# take stages rather than cosines: the registry's factories, with the settings
# the tests were written for (a few scales below the default keep the reference
# tolerances meaningful), plus stages a user composes.
_named = mj.NAMED_STAGES
STAGES = {
    "normface": _named["normface"](),
    "cosface": _named["cosface"](),
    "arcface": _named["arcface"](),
    "arcface_easy": _named["arcface"](easy_margin=True),
    "arcface_st": _named["arcface"](straight_through=True),
    "combined": _named["combined"](),
    "combined_m1_2": _named["combined"](m1=2.0, m2=0.1, m3=0.1, scale=32.0),
    "combined_m1_1.5": _named["combined"](m1=1.5, m2=0.1, m3=0.1, scale=32.0),
    "sphereface": _named["sphereface"](lambda_=5.0, scale=16.0),
    "sv": _named["sv_softmax"](),
    "sv_am": _named["sv_softmax"](margin_type="cosface", margin=0.35),
    "sv_arc": _named["sv_softmax"](margin_type="arcface", margin=0.5),
    "mv_am": _named["mv_softmax"](),
    "mv_arc_fixed": _named["mv_softmax"](
        margin_type="arcface", margin=0.5, mode="fixed"
    ),
    # CurricularFace's stages with t held fixed (the registry's entry updates t).
    "curricular": mj.Stages(
        functools.partial(mj.arcface_target, margin=0.5),
        functools.partial(mj.curricular_non_target, t=0.3),
        64.0,
    ),
    "eqm": _named["eqm"](),
}


# --------------------------------------------------------------------------- #
# Training runs (train/): what a finished run left in its workdir
# --------------------------------------------------------------------------- #


def final_state(workdir, config, image_shape=(8, 8, 1), num_classes=7):
    """(latest step, host TrainState) of the run in ``workdir``."""
    import os

    import jax

    from train import checkpoint, train

    tx, _ = train.create_optimizer(config)
    _, _, like = train.create_train_state(config, image_shape, num_classes, tx)
    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"), every=1, keep=9
    )
    try:
        return ckpt.latest_step(), jax.device_get(ckpt.restore(like))
    finally:
        ckpt.close()


def metrics_records(workdir) -> list[dict]:
    """The records of ``workdir``/metrics.jsonl."""
    import json
    import os

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def pairs_bin(path, images, labels, num_pairs, seed):
    """A .bin of alternating genuine / impostor pairs of RGB images."""
    rng = np.random.default_rng(seed)
    out, issame = [], []
    for p in range(num_pairs):
        same = p % 2 == 0
        a = rng.integers(len(labels))
        pool = np.flatnonzero((labels == labels[a]) != (not same))
        pool = pool[pool != a]
        out += [images[a], images[rng.choice(pool)]]
        issame.append(same)
    rgb = np.stack(out)
    if rgb.shape[-1] == 1:
        rgb = np.repeat(rgb, 3, axis=-1)
    from margin_jax import eval as mj_eval

    mj_eval.write_bin(path, rgb, issame)
    return str(path)


def train_main_command(workdir, *flags, config="train/configs/tiny.py"):
    """``python -m train.main`` with a config of this repository and flags."""
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return [
        sys.executable,
        "-m",
        "train.main",
        "--config",
        os.path.join(root, config),
        "--workdir",
        str(workdir),
        *flags,
    ]
