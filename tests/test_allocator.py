"""keep_freed_memory: a re-allocated large block no longer faults its pages in again."""

import platform
import subprocess
import sys

import pytest

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# In a child process: the setting is process-wide and must not leak into the test run.
SCRIPT = """
import resource, numpy as np
from unetile.allocator import keep_freed_memory

def faults_of_reallocation():
    block = np.ones(32 * 2**20)  # 256 MiB, above glibc's largest mmap threshold (32 MiB)
    del block
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.ones(32 * 2**20)
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults_of_reallocation()
applied = keep_freed_memory()
print(default, applied, faults_of_reallocation())
"""


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_reallocating_a_large_block_faults_no_pages_once_applied():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True
    )
    default, applied, kept = result.stdout.split()
    assert applied == "True"
    # glibc's default maps fresh pages for the block every time (64 Ki pages of
    # 4 KiB, or 128 of 2 MiB with transparent huge pages); kept memory is reused.
    assert int(default) >= 100
    assert int(kept) < int(default) // 10


def test_elsewhere_nothing_changes(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    from unetile.allocator import keep_freed_memory

    assert keep_freed_memory() is False
