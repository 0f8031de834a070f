"""Reconnect-delay policy: exponential growth, capped, with full jitter above a floor.

Pure: no clock, no sleeping, no state. A transport keeps its own attempt counter (0 for the first retry after a
drop, +1 after every failed attempt, back to 0 after a successful connection) and asks for
``backoff.delay(attempt)``. There is no attempt limit: the policy never gives up, a transport retries forever.

For attempt ``n`` the ceiling is ``min(maximum, initial * multiplier**n)`` and the delay is drawn uniformly from
``[initial, ceiling]`` ("full jitter" with a floor): a broker that comes back is not hit by every consumer in the
same second, and no consumer ever retries faster than ``initial``. With the defaults: 1 s, then 1-2 s, 1-4 s, ...,
never more than 60 s.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter between ``initial`` and the (capped) exponential ceiling."""

    initial: float = 1.0
    maximum: float = 60.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.initial) and self.initial > 0):
            raise ValueError(f"backoff initial delay must be a positive number, got {self.initial!r}")
        if not (math.isfinite(self.maximum) and self.maximum >= self.initial):
            raise ValueError(
                f"backoff maximum must be a finite number >= initial ({self.initial}), got {self.maximum!r}"
            )
        if not (math.isfinite(self.multiplier) and self.multiplier >= 1.0):
            raise ValueError(f"backoff multiplier must be >= 1, got {self.multiplier!r}")

    def ceiling(self, attempt: int) -> float:
        """The largest delay for ``attempt`` (0-based): ``min(maximum, initial * multiplier**attempt)``.

        Safe for any attempt number (no overflow for attempt 10**9).
        """
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        if self.multiplier == 1.0 or self.maximum == self.initial:
            return self.initial
        # Number of doublings after which the cap is reached; beyond it, never compute the power.
        steps_to_cap = math.log(self.maximum / self.initial, self.multiplier)
        if attempt >= steps_to_cap:
            return self.maximum
        return min(self.maximum, self.initial * self.multiplier**attempt)

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """A jittered delay for ``attempt``, uniformly in ``[initial, ceiling(attempt)]``.

        ``rand`` returns a float in ``[0, 1)`` (injectable for tests).
        """
        ceiling = self.ceiling(attempt)
        fraction = min(max(rand(), 0.0), 1.0)
        return self.initial + (ceiling - self.initial) * fraction

    def delays(self, rand: Callable[[], float] = random.random) -> Iterator[float]:
        """An endless iterator of delays for attempts 0, 1, 2, ... (it never stops: the policy never gives up)."""
        attempt = 0
        while True:
            yield self.delay(attempt, rand)
            attempt += 1
