"""The one timing rule every benchmark here uses: median after a warm-up."""

from __future__ import annotations

import statistics
import time


def median_seconds(step, *, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``step()`` (which must block until its work is done)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def median_ms_jax(fn, *args, repeats: int) -> float:
    """Median ms of a JAX function, compiled and warmed up first."""
    import jax

    return 1e3 * median_seconds(
        lambda: jax.block_until_ready(fn(*args)), repeats=repeats
    )
