"""What the benchmarks measure the machine by: its fp32 matmul peak, taken in the same run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


def in_subprocess(script: str, spec: dict) -> dict:
    """Run ``script --child SPEC`` in a fresh process (its own peak memory); its JSON result.

    The child prints its result as JSON on its last line; a failure comes back as
    ``{"job": spec, "failed": <last stderr line>}``.
    """
    load_before = os.getloadavg()[0]
    completed = subprocess.run(
        [sys.executable, script, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        tail = completed.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"job": spec, "failed": tail[0]}
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    return {"job": spec, **result, "load_average_before": load_before}
