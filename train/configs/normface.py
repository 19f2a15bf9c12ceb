"""NormFace: normalised softmax with a fixed scale."""

from train.configs._family import with_loss


def get_config(base="default"):
    return with_loss("normface", base)
