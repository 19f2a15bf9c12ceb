"""Open-set evaluation on held-out identities with margin_jax.eval.

The model never saw these classes. Reported, as face-recognition papers do:
verification accuracy (LFW protocol, 10 folds) and VAL@FAR on pairs built from
held-out classes, TAR@FAR from one ROC over all pairs, Recall@K, precision@1,
R-precision and MAP@R of retrieval among held-out images, and NMI of k-means
clusters. Test-time flip fusion is not used: flipped digits are other glyphs.
Two baselines are scored on the same pairs and queries (`evaluate_baselines`):
raw pixels and the network at initialisation; a trained model has to beat
both to have learnt anything that transfers to unseen identities.
"""

from __future__ import annotations

import copy
import functools

import jax
import numpy as np
from flax import nnx

from margin_jax import eval as mj_eval
from train import input_pipeline


@functools.partial(jax.jit, static_argnums=0)
def _apply(eval_graphdef, params, batch_stats, x):
    return nnx.merge(eval_graphdef, params, batch_stats)(x)


def _reader(images):
    """(start, stop) -> uint8 images of an array or an `input_pipeline.Subset`."""
    return images.read if hasattr(images, "read") else lambda i, j: images[i:j]


def embed(eval_graphdef, params, batch_stats, images, *, batch_size=256):
    """Embeddings [N, D] (float32 NumPy) of uint8 images, model in eval mode.

    ``images`` is an array [N, H, W, C] or an `input_pipeline.Subset`, read
    ``batch_size`` images at a time (host memory: one block). Every block has
    ``batch_size`` rows (the last one padded), so one model compiles once
    whatever N is.
    """
    read = _reader(images)
    chunks = []
    for i in range(0, len(images), batch_size):
        block = input_pipeline.preprocess(read(i, i + batch_size))
        n = len(block)
        if n < batch_size:
            block = np.concatenate(
                [block, np.zeros_like(block[:1]).repeat(batch_size - n, 0)]
            )
        chunks.append(np.asarray(_apply(eval_graphdef, params, batch_stats, block))[:n])
    return np.concatenate(chunks)


def make_pairs(labels: np.ndarray, num_pairs: int, seed: int):
    """Alternating genuine / impostor pairs (i, j) of distinct images, seeded.

    Alternating keeps every contiguous fold of the LFW protocol balanced.
    Returns (first [P], second [P], issame bool [P]).
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    first, second = np.empty(num_pairs, int), np.empty(num_pairs, int)
    issame = np.arange(num_pairs) % 2 == 0
    for p in range(num_pairs):
        if issame[p]:
            members = by_class[rng.integers(len(classes))]
            first[p], second[p] = rng.choice(members, 2, replace=False)
        else:
            a, b = rng.choice(len(classes), 2, replace=False)
            first[p], second[p] = rng.choice(by_class[a]), rng.choice(by_class[b])
    return first, second, issame


def open_set_metrics(embeddings: np.ndarray, labels: np.ndarray, config) -> dict:
    """Every open-set metric of ``embeddings`` [N, D] (JSON-ready, plus the
    arrays of the plots under ``_arrays``): pairs and queries from
    ``config.eval_num_pairs`` and ``config.seed``, so two embeddings of the
    same images are scored on the same pairs."""
    emb = np.asarray(embeddings, np.float32)
    first, second, issame = make_pairs(labels, config.eval_num_pairs, config.seed)
    verification = mj_eval.verification_accuracy(emb[first], emb[second], issame)
    scores = mj_eval.pair_similarity(emb[first], emb[second])
    tar = mj_eval.tar_at_far(scores, issame, fars=(1e-3, 1e-2, 1e-1))
    recall = mj_eval.recall_at_k(emb, labels, ks=(1, 2, 4, 8))
    retrieval = mj_eval.retrieval_metrics(emb, labels)
    results = {
        "held_out_classes": [int(c) for c in np.unique(labels)],
        "num_held_out_images": int(len(labels)),
        "num_pairs": int(len(issame)),
        "verification_accuracy": float(verification["mean"]),
        "verification_accuracy_std": float(verification["std"]),
        "val_at_far_1e-3": float(verification["val"]),
        "tar_at_far": {
            f"{f:g}": float(t) for f, t in zip(tar["far"], tar["tar"], strict=True)
        },
        "roc_auc": float(tar["auc"]),
        "recall_at_k": {
            k: float(v) for k, v in recall.items() if k.startswith("recall")
        },
        "precision_at_1": float(retrieval["precision_at_1"]),
        "r_precision": float(retrieval["r_precision"]),
        "map_at_r": float(retrieval["map_at_r"]),
        "nmi": float(
            mj_eval.nmi(
                emb, labels, seed=config.seed, n_init=config.get("eval_nmi_inits", 10)
            )
        ),
    }
    # Arrays for the plots; `report.write_report` drops them from eval.json.
    results["_arrays"] = {
        "embeddings": emb,
        "labels": labels,
        "scores": scores,
        "issame": issame,
    }
    return results


def evaluate_open_set(eval_graphdef, params, batch_stats, held_out, config) -> dict:
    """All open-set metrics of the model as a JSON-ready dict (plus arrays for
    the plots)."""
    emb = embed(eval_graphdef, params, batch_stats, held_out)
    return open_set_metrics(emb, held_out.labels, config)


def raw_pixels(images, *, batch_size=1024) -> np.ndarray:
    """The raw-pixel embedding [N, H·W·C]: each image flattened, its uint8
    values / 255, L2-normalised (an all-black image stays 0)."""
    read = _reader(images)
    blocks = []
    for i in range(0, len(images), batch_size):
        block = read(i, i + batch_size)
        x = block.reshape(len(block), -1).astype(np.float32) / 255.0
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        blocks.append(x / np.maximum(norm, 1e-12))
    return np.concatenate(blocks)


BASELINES = ("raw_pixels", "untrained")


def evaluate_baselines(
    eval_graphdef, init_params, init_batch_stats, held_out, config
) -> dict:
    """{"raw_pixels": metrics, "untrained": metrics}, each with the keys of
    `open_set_metrics`, on the same held-out pairs and queries as the model:
    the flattened images (`raw_pixels`) and the same network at its
    initialisation (``init_params``, ``init_batch_stats``)."""
    untrained = evaluate_open_set(
        eval_graphdef, init_params, init_batch_stats, held_out, config
    )
    untrained.pop("_arrays")
    return {"raw_pixels": _raw_pixel_metrics(held_out, config), "untrained": untrained}


# Raw-pixel metrics by (data, held-out rows, pairs, seed): the same for every
# run on those images, so `train.compare` computes them once per seed.
_RAW_PIXEL_CACHE: dict = {}


def _raw_pixel_metrics(held_out, config) -> dict:
    key = None
    if hasattr(held_out, "records"):
        key = (
            held_out.records.spec,
            hash(np.asarray(held_out.index).tobytes()),
            config.seed,
            config.eval_num_pairs,
            config.get("eval_nmi_inits", 10),
        )
        if key in _RAW_PIXEL_CACHE:
            return copy.deepcopy(_RAW_PIXEL_CACHE[key])
    metrics = open_set_metrics(raw_pixels(held_out), held_out.labels, config)
    metrics.pop("_arrays")
    if key is not None:
        if len(_RAW_PIXEL_CACHE) >= 16:  # a few seeds' worth of small dicts
            _RAW_PIXEL_CACHE.pop(next(iter(_RAW_PIXEL_CACHE)))
        _RAW_PIXEL_CACHE[key] = copy.deepcopy(metrics)
    return metrics
