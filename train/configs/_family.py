"""Helper for the per-loss-family configs: a base config with another loss.

Every family file's ``get_config(base="default")`` takes the base on the
command line after a colon: ``--config train/configs/cosface.py`` (glyphs,
the default) or ``--config train/configs/cosface.py:digits``. The family's
hyperparameters are the base's tuned line for that loss
(``LOSS_HYPERPARAMETERS`` of train/configs/default.py or digits.py).
"""

import importlib

BASES = ("default", "digits")


def base_config(base: str):
    """The config of ``base`` (train/configs/<base>.py)."""
    if base not in BASES:
        raise ValueError(
            f"Unknown base config {base!r}; valid choices: {', '.join(BASES)} "
            "(e.g. --config train/configs/cosface.py:digits)."
        )
    return importlib.import_module(f"train.configs.{base}").get_config()


def with_loss(name: str, base: str = "default", **hyperparameters):
    """``base``'s config training loss ``name``; ``hyperparameters`` (flat)
    override the tuned line."""
    config = base_config(base or "default")
    config.loss.name = name
    config.loss.update(hyperparameters)
    return config
