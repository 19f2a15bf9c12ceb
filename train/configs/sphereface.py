"""SphereFace / A-Softmax, original form, λ annealed with the step."""

from train.configs._family import with_loss


def get_config():
    return with_loss(
        "sphereface", margin=4, base=1000.0, gamma=0.12, power=1.0, lambda_min=5.0
    )
