"""NormFace: normalised softmax with a fixed scale."""

from train.configs._family import with_loss


def get_config():
    return with_loss("normface", scale=16.0)
