"""Mining-based softmax: HM-Softmax on ArcFace margin logits."""

from train.configs._family import with_loss


def get_config():
    return with_loss("hard_mining", scale=16.0, margin=0.5, keep_ratio=0.9)
