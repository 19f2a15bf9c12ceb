"""Root pytest configuration: eight fake CPU devices, set before JAX is imported.

It lives at the root so that both tests/ and the doctests of margin_jax/ see the
same devices.
"""

import os

# Eight fake devices share 2 cores (and two xdist workers share those): XLA's
# default 40 s limit for every device thread to reach a collective can pass on
# a loaded machine and abort the process, so the limits are raised for tests.
_FLAGS = (
    "--xla_force_host_platform_device_count=8",
    "--xla_cpu_collective_call_terminate_timeout_seconds=900",
    "--xla_cpu_collective_timeout_seconds=900",
)
for _flag in _FLAGS:
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " " + _flag
        ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
