"""CosFace / AM-Softmax: additive cosine margin."""

from train.configs._family import with_loss


def get_config(base="default"):
    return with_loss("cosface", base)
