"""Clustering quality of embeddings: NMI of k-means clusters against the labels."""

from __future__ import annotations

import numpy as np

from margin_jax.eval import _checks

__all__ = ["nmi"]


def nmi(
    embeddings,
    labels,
    *,
    seed: int = 0,
    n_init: int = 10,
    normalize: bool = True,
) -> float:
    """Normalised mutual information between k-means clusters and the labels.

    Runs k-means with k = number of distinct labels, then
    NMI(Y, C) = I(Y; C) / ((H(Y) + H(C)) / 2), sklearn's
    normalized_mutual_info_score with average_method='arithmetic'.

    k-means is sklearn's KMeans(n_clusters=k, random_state=seed,
    n_init=n_init) (k-means++ init, Lloyd), pinned so the value does not move
    with sklearn's default of n_init. pytorch-metric-learning clusters with
    faiss k-means (20 iterations, one init) instead, so its NMI differs by
    k-means noise. Embeddings are L2-normalised first by default (as the
    retrieval metrics use cosine); `normalize=False` clusters them raw, as
    pytorch-metric-learning does.

    Args:
      embeddings: embeddings [N, D].
      labels: class labels [N] (any integer or string dtype); at least two
        classes (with one, NMI is meaningless and sklearn would return 1.0).
      seed: KMeans random_state.
      n_init: KMeans restarts; the best inertia wins.
      normalize: L2-normalise the rows before clustering.

    Returns:
      NMI in [0, 1] (Python float).

    Example:
      >>> import numpy as np
      >>> x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
      >>> nmi(x, np.array([0, 0, 1, 1]))
      1.0

    References:
      Strehl & Ghosh, "Cluster Ensembles", JMLR 2002 (NMI); Schroff et al.
      2015 / Song et al. 2016 (NMI for embeddings); Vinh et al., JMLR 2010
      (the arithmetic normalisation).
    """
    fn = "nmi"
    emb = _checks.embeddings_array(embeddings, "embeddings", fn)
    codes, counts = _checks.label_codes(
        labels, "labels", fn, n=emb.shape[0], ref="embeddings", ref_shape=emb.shape
    )
    if counts.size < 2:
        raise ValueError(
            f"{fn}: `labels` must contain at least 2 classes (k-means with k = "
            f"number of classes); got a single class for `embeddings` shape "
            f"{emb.shape}."
        )
    cluster = _checks.require("sklearn.cluster", fn)
    metrics = _checks.require("sklearn.metrics", fn)
    if normalize:
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        emb = emb / np.maximum(norms, 1e-12)
    kmeans = cluster.KMeans(
        n_clusters=int(counts.size), random_state=seed, n_init=n_init
    )
    assigned = kmeans.fit_predict(emb)
    score = metrics.normalized_mutual_info_score(
        codes, assigned, average_method="arithmetic"
    )
    return float(score)
