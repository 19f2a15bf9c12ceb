"""SV-Arc-Softmax: support-vector re-weighting on the ArcFace target."""

from train.configs._family import with_loss


def get_config(base="default"):
    return with_loss("sv_softmax", base)
