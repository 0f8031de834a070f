"""Clocks. The daemon reads time only through a `Clock`, so a replay can follow the recorded times."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """Aware UTC wall-clock time."""
        ...

    def monotonic(self) -> float: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


class FixedClock:
    """A clock a test or a replay moves by hand."""

    def __init__(self, start: datetime) -> None:
        self._now = start
        self._mono = 0.0

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def set(self, when: datetime) -> None:
        delta = (when - self._now).total_seconds()
        if delta > 0:
            self._mono += delta
        self._now = when

    def advance(self, seconds: float) -> None:
        from datetime import timedelta

        self.set(self._now + timedelta(seconds=seconds))
