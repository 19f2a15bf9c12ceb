"""Evaluation protocols: verification, TAR@FAR, retrieval and clustering metrics.

Everything here runs eagerly on concrete arrays and returns NumPy values.
scikit-learn, Pillow and matplotlib are optional extras, imported only by the
functions that need them (``pip install margin-jax[eval]`` / ``[plots]``).
"""

from margin_jax.eval.bin_io import load_bin as load_bin
from margin_jax.eval.bin_io import write_bin as write_bin
from margin_jax.eval.classification import macro_accuracy as macro_accuracy
from margin_jax.eval.clustering import nmi as nmi
from margin_jax.eval.knn import knn_search as knn_search
from margin_jax.eval.plots import plot_roc as plot_roc
from margin_jax.eval.plots import plot_score_histogram as plot_score_histogram
from margin_jax.eval.retrieval import recall_at_k as recall_at_k
from margin_jax.eval.retrieval import retrieval_metrics as retrieval_metrics
from margin_jax.eval.verification import ACCURACY_THRESHOLDS as ACCURACY_THRESHOLDS
from margin_jax.eval.verification import VAL_THRESHOLDS as VAL_THRESHOLDS
from margin_jax.eval.verification import evaluate_bin as evaluate_bin
from margin_jax.eval.verification import evaluate_pairs as evaluate_pairs
from margin_jax.eval.verification import flip_fused_embeddings as flip_fused_embeddings
from margin_jax.eval.verification import pair_similarity as pair_similarity
from margin_jax.eval.verification import roc_curve as roc_curve
from margin_jax.eval.verification import split_pairs as split_pairs
from margin_jax.eval.verification import tar_at_far as tar_at_far
from margin_jax.eval.verification import val_at_far as val_at_far
from margin_jax.eval.verification import verification_accuracy as verification_accuracy

__all__ = [
    "ACCURACY_THRESHOLDS",
    "VAL_THRESHOLDS",
    "evaluate_bin",
    "evaluate_pairs",
    "flip_fused_embeddings",
    "knn_search",
    "load_bin",
    "macro_accuracy",
    "nmi",
    "pair_similarity",
    "plot_roc",
    "plot_score_histogram",
    "recall_at_k",
    "retrieval_metrics",
    "roc_curve",
    "split_pairs",
    "tar_at_far",
    "val_at_far",
    "verification_accuracy",
    "write_bin",
]
