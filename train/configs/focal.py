"""Mining-based softmax: focal loss on ArcFace margin logits."""

from train.configs._family import with_loss


def get_config(base="default"):
    return with_loss("focal", base)
