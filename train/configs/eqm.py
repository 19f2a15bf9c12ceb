"""EqM (reconstruction, see margin_jax.eqm_loss): two hinge bounds."""

from train.configs._family import with_loss


def get_config():
    return with_loss("eqm", scale=16.0, t1=0.6, t2=0.25)
