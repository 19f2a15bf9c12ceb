"""Root pytest configuration: eight fake CPU devices, set before JAX is imported.

It lives at the root so that both tests/ and the doctests of margin_jax/ see the
same devices.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
