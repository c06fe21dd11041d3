"""Timing helper shared by the benchmarks: one warm-up call, then the median of repeated runs."""

import statistics
import time


def median_seconds(fn, reps: int = 7) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
