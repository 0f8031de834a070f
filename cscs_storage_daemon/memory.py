"""Handing freed heap memory back to the system, once a minute (glibc's ``malloc_trim``).

The daemon keeps nothing per order (tests/test_memory_bounds.py), yet its RSS crept up in the soak: the heap census
stayed flat while glibc's malloc arenas kept free, fragmented pages of the worker threads' short-lived allocations.
`MALLOC_ARENA_MAX=2` in the unit limits the arenas; ``malloc_trim(0)`` returns the free pages of every arena to the
kernel. It takes a few milliseconds and runs on the daemon's main loop, never on a worker. Where the C library has
no ``malloc_trim`` (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable

DEFAULT_PERIOD = 60.0


def _libc_trim() -> Callable[[], bool] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int

    def call() -> bool:
        return bool(trim(0))

    return call


class MemoryTrimmer:
    """Calls `trim` at most once per `period` seconds of `clock`; `due()` from a loop that runs often."""

    def __init__(
        self,
        period: float = DEFAULT_PERIOD,
        *,
        trim: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.period = period
        self._trim = trim if trim is not None else _libc_trim()
        self._clock = clock
        self._last = clock()
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def due(self) -> bool:
        """Trim if a period has passed since the last one; True when it did."""
        if self._trim is None:
            return False
        now = self._clock()
        if now - self._last < self.period:
            return False
        self._last = now
        self._trim()
        self.trims += 1
        return True
