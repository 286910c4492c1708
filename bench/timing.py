"""Timing helper shared by the benchmarks (run them as `python bench/<name>.py`)."""

from __future__ import annotations

import time


def best_of(repeat: int, fn, warmup: bool = True) -> float:
    """Fastest of `repeat` calls of fn(), in seconds (after one warm-up call unless warmup=False)."""
    if warmup:
        fn()  # allocator, lazy initialisation
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)
