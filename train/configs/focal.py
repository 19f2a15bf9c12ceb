"""Mining-based softmax: focal loss on ArcFace margin logits."""

from train.configs._family import with_loss


def get_config():
    return with_loss("focal", scale=16.0, margin=0.5, gamma=2.0)
