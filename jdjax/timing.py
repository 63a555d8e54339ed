"""Timing that respects asynchronous dispatch: first call (compilation) apart, median after warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def time_call(fn: Callable[[], object], warmup: int = 2, repeats: int = 10) -> dict:
    """Times `fn()` (which must block until its result is ready, e.g. via block_until_ready).

    The first call is reported apart as `first_s` (it includes compilation); then `warmup`
    untimed calls; then `repeats` timed calls summarised by their median and 10/90 % quantiles.
    """
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]
    return {"first_s": first, "median_s": statistics.median(times), "p10_s": q(0.1), "p90_s": q(0.9), "repeats": repeats}
