"""Combined margin cos(m1·θ + m2) - m3 (insightface)."""

from train.configs._family import with_loss


def get_config():
    return with_loss("combined", scale=16.0, m1=1.0, m2=0.3, m3=0.2)
