"""Plain softmax cross-entropy (the baseline)."""

from train.configs._family import with_loss


def get_config(base="default"):
    return with_loss("softmax", base)
