"""Test configuration. The root conftest.py fakes 8 CPU devices before JAX loads."""

import jax

assert jax.device_count() == 8, "the root conftest.py must run before jax is imported"
