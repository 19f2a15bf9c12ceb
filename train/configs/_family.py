"""Helper for the per-loss-family configs: the default with another loss."""

from train.configs import default


def with_loss(name: str, **hyperparameters):
    config = default.get_config()
    config.loss = {"name": name, **hyperparameters}
    return config
