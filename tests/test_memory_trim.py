"""The trimmer that hands freed heap pages back to the system once a period (cscs_storage_daemon/memory.py)."""

from __future__ import annotations

import sys

import pytest

from cscs_storage_daemon.memory import MemoryTrimmer


def test_trims_once_per_period_of_its_clock() -> None:
    now = [100.0]
    calls: list[float] = []
    trimmer = MemoryTrimmer(60.0, trim=lambda: calls.append(now[0]) is None, clock=lambda: now[0])
    for step in range(0, 181):  # three minutes, the main loop's one-second ticks
        now[0] = 100.0 + step
        trimmer.due()
    assert calls == [160.0, 220.0, 280.0]
    assert trimmer.trims == 3


def test_nothing_happens_without_malloc_trim() -> None:
    trimmer = MemoryTrimmer(0.0, trim=None)
    trimmer._trim = None  # as on a C library without malloc_trim
    assert not trimmer.available and not trimmer.due()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_the_real_malloc_trim_runs_here() -> None:
    trimmer = MemoryTrimmer(0.0)
    assert trimmer.available
    garbage = [bytearray(4096) for _ in range(20_000)]  # ~80 MB in small blocks, then freed
    del garbage
    assert trimmer.due() and trimmer.trims == 1
