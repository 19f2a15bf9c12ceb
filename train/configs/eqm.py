"""EqM (reconstruction, see margin_jax.eqm_loss): two hinge bounds."""

from train.configs._family import with_loss


def get_config(base="default"):
    return with_loss("eqm", base)
