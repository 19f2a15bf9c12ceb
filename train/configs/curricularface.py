"""CurricularFace: EMA t carried in the loss state."""

from train.configs._family import with_loss


def get_config():
    return with_loss("curricularface", scale=16.0, margin=0.5)
