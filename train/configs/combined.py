"""Combined margin cos(m1·θ + m2) - m3 (insightface)."""

from train.configs._family import with_loss


def get_config(base="default"):
    return with_loss("combined", base)
