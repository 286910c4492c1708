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


def matmul_rate(n: int = 2048, repeat: int = 5) -> float:
    """FLOP/s of a float32 [n, n] x [n, n] GEMM on the current threads, best of `repeat`: the
    physical limit the benchmarks compare achieved FLOP/s with."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / best_of(repeat, lambda: a @ b)
