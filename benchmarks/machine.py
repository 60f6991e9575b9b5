"""What the benchmarks measure the machine by: its fp32 matmul peak, taken in the same run."""

from __future__ import annotations

import time

import torch


def matmul_peak_gflops(repeats: int = 5, size: int = 4096) -> float:
    """Best fp32 matmul rate of this machine (GFLOP/s), torch's default thread count."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def machine_info(**extra) -> dict:
    """What the results JSON records of the machine, plus script-specific ``extra`` entries."""
    import os
    import platform

    import numpy

    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "memory_bytes": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "torch": torch.__version__,
        **extra,
    }
