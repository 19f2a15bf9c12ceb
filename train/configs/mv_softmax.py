"""MV-AM-Softmax (adaptive): mis-classified vector guided softmax."""

from train.configs._family import with_loss


def get_config():
    return with_loss(
        "mv_softmax",
        scale=16.0,
        t=0.2,
        margin_type="cosface",
        margin=0.35,
        mode="adaptive",
    )
