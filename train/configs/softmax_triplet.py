"""Softmax + triplet two-head regulariser (Taha et al. 2020).

A classifier head (GAP -> FC(C)) trained by CE and an embedding head
(flatten -> FC(256) -> L2-normalise) trained by λ·triplet with semi-hard
mining, squared L2, margin 0.2, λ = 1. The embedding head is evaluated.
Mining needs P x K batches: the paper's 8 classes x 4 images. On the glyphs
P = 64 classes x K = 4 images (the default batch of 256); the digits have
only 7 training classes, so there P = 7 and K = 16 (112 images, close to
their batch of 128).
"""

from train.configs._family import with_loss


def get_config(base="default"):
    config = with_loss("softmax_triplet", base)
    config.model = "small_cnn_two_head"
    config.embedding_dim = 256
    config.sampler = "pk"
    if base == "digits":
        config.images_per_class = 16
        config.batch_size = config.num_train_classes * config.images_per_class
    else:
        config.images_per_class = 4
    return config
