"""SV-Arc-Softmax: support-vector re-weighting on the ArcFace target."""

from train.configs._family import with_loss


def get_config():
    return with_loss("sv_softmax", scale=16.0, t=1.2, margin_type="arcface", margin=0.5)
