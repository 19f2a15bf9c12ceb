"""Plain softmax cross-entropy (the baseline)."""

from train.configs._family import with_loss


def get_config():
    return with_loss("softmax")
