"""Keep freed memory in the process, so that big activations are not faulted in every step.

A training step allocates and frees the same large activations over and over
(83 MiB each at the paper's width on a 572 tile). glibc serves every block
above its mmap threshold, which grows to 32 MiB at most, with fresh pages from
the kernel and gives them back on ``free``; the next step then pays a page
fault and the kernel's zeroing for every 4 KiB again. Telling malloc to serve
large blocks from its heap and never trim it made a paper-width training step
1.29x faster on a 2-core CPU (``benchmarks/train_step.py``). The price: the
process keeps its peak memory until it exits, which suits a training or
prediction process.

It changes the whole process, so the command line calls it (it owns the
process) and a library user opts in by calling it.
"""

from __future__ import annotations

import ctypes
import platform
import sys

# From <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory instead of returning it to the kernel.

    Returns
    -------
    applied : bool
        True when the C library is glibc and accepted both settings; False
        elsewhere (macOS, Windows, musl), where nothing changes.

    Examples
    --------
    >>> from unetile.allocator import keep_freed_memory
    >>> keep_freed_memory()  # doctest: +SKIP
    True
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt(3): 0 disables mmap for large requests; -1 disables trimming.
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))
