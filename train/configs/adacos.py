"""Dynamic AdaCos: adaptive scale carried in the loss state."""

from train.configs._family import with_loss


def get_config(base="default"):
    return with_loss("adacos", base)
