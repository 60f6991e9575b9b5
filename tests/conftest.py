"""Shared test set-up: every test sees the same processor."""

from __future__ import annotations

import pytest

from unetile import precision


@pytest.fixture(autouse=True)
def processor_without_bf16(monkeypatch):
    # The command line's --precision auto takes bf16 where the CPU has it; the tests
    # compare with fp32 references, so they see a CPU without it unless they say
    # otherwise (tests/test_precision.py's with_bf16).
    monkeypatch.setattr(precision, "cpu_features", lambda: {"avx2": True, "avx": True})
