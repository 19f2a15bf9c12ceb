"""SphereFace / A-Softmax, original form, λ annealed with the step."""

from train.configs._family import with_loss


def get_config(base="default"):
    return with_loss("sphereface", base)
