"""ArcFace: additive angular margin cos(θ + m) (the default config's loss)."""

from train.configs._family import with_loss


def get_config(base="default"):
    return with_loss("arcface", base)
