"""Former home of `margin_jax.non_targets` and `margin_jax.example_weights`.

Kept as an alias module: every public name still imports from here.
"""

from margin_jax.example_weights import *  # noqa: F403
from margin_jax.example_weights import __all__ as _example_weights
from margin_jax.non_targets import *  # noqa: F403
from margin_jax.non_targets import __all__ as _non_targets

__all__ = [*_non_targets, *_example_weights]
