"""Former name of `margin_jax.targets` (the target transforms); kept as an alias."""

from margin_jax.targets import *  # noqa: F403
from margin_jax.targets import __all__ as __all__
from margin_jax.targets import check_sphere_margin as check_sphere_margin
