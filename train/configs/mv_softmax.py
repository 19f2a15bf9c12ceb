"""MV-AM-Softmax (adaptive): mis-classified vector guided softmax."""

from train.configs._family import with_loss


def get_config(base="default"):
    return with_loss("mv_softmax", base)
