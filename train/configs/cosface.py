"""CosFace / AM-Softmax: additive cosine margin."""

from train.configs._family import with_loss


def get_config():
    return with_loss("cosface", scale=16.0, margin=0.35)
