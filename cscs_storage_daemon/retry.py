"""Retry policy for Waldur REST calls.

Only transient failures are retried: connection errors, timeouts and other transport errors, HTTP 429 and
HTTP 5xx. Backoff is exponential with full jitter (a random wait between 0 and ``min(initial * 2**n, max_wait)``),
at least the server's ``Retry-After`` on a 429 (capped by ``max_wait``). Retrying stops after ``attempts`` tries or
when the next wait would take the whole call past ``total`` seconds, whichever comes first.

Every retry is logged as ``waldur.retry`` with the method, the path, the attempt number and the reason. Headers, the
query string and the token are never logged.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import structlog
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
)

log = structlog.get_logger(__name__)

RETRY_EVENT = "waldur.retry"


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try a Waldur call before giving up.

    attempts: the maximum number of tries (the first one included).
    max_wait: the longest single wait between two tries, in seconds.
    total: the longest time one call may take, all tries and waits together, in seconds.
    initial: the first backoff step, in seconds (doubled on every retry, then jittered).
    """

    attempts: int = 6
    max_wait: float = 30.0
    total: float = 120.0
    initial: float = 0.5

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")
        if self.max_wait < 0 or self.total < 0 or self.initial < 0:
            raise ValueError("RetryPolicy durations must not be negative")


@dataclass(frozen=True)
class RetryInfo:
    """What `on_retry` receives for every retry (low-cardinality `operation` and `reason` suit metric labels)."""

    operation: str
    method: str
    path: str
    attempt: int
    reason: str
    wait: float


OnRetry = Callable[[RetryInfo], None]


class TransientHTTPStatus(Exception):
    """A 429 or 5xx answer: worth another try."""

    def __init__(self, status: int, detail: str = "", retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.detail = detail
        self.retry_after = retry_after


def is_transient_status(status: int) -> bool:
    return status == 429 or 500 <= status <= 599


def is_transient(exc: BaseException) -> bool:
    """True for failures that another try may cure."""
    return isinstance(exc, (TransientHTTPStatus, httpx.TransportError))


def describe(exc: BaseException | None) -> str:
    """A short, secret-free reason: ``HTTP 503``, ``ReadTimeout``, ``ConnectError``..."""
    if exc is None:
        return "unknown"
    if isinstance(exc, TransientHTTPStatus):
        return f"HTTP {exc.status}"
    return type(exc).__name__


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (the delta-seconds form; an HTTP date is ignored)."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if seconds < 0:
        return None
    return seconds


#: The jitter's source when none is given: one generator for the process (seeding one per call costs more than the
#: call it would serve).
_JITTER = random.Random()


class _FullJitterWait:
    """``random(0, min(initial * 2**(n-1), max_wait))``, raised to ``Retry-After`` when the server sent one."""

    def __init__(self, policy: RetryPolicy, rng: random.Random | None) -> None:
        self._policy = policy
        self._rng = rng or _JITTER

    def __call__(self, state: RetryCallState) -> float:
        policy = self._policy
        exponent = max(state.attempt_number - 1, 0)
        ceiling = min(policy.initial * (2.0 ** min(exponent, 60)), policy.max_wait)
        wait = self._rng.uniform(0.0, ceiling)
        outcome = state.outcome
        exc = outcome.exception() if outcome is not None and outcome.failed else None
        if isinstance(exc, TransientHTTPStatus) and exc.retry_after is not None:
            wait = max(wait, min(exc.retry_after, policy.max_wait))
        return wait


def build_retrying(
    policy: RetryPolicy,
    *,
    method: str,
    path: str,
    operation: str = "",
    on_retry: OnRetry | None = None,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
    elapsed: float = 0.0,
) -> Retrying:
    """A tenacity `Retrying` for one Waldur call; the last exception is re-raised when it gives up.

    ``elapsed``: seconds the call already took before this `Retrying` started (a first attempt made without it);
    they count against ``policy.total``.
    """

    def before_sleep(state: RetryCallState) -> None:
        outcome = state.outcome
        exc = outcome.exception() if outcome is not None and outcome.failed else None
        reason = describe(exc)
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        log.warning(
            RETRY_EVENT,
            method=method,
            path=path,
            attempt=state.attempt_number,
            reason=reason,
            wait=round(wait, 3),
        )
        if on_retry is not None:
            info = RetryInfo(
                operation=operation or path,
                method=method,
                path=path,
                attempt=state.attempt_number,
                reason=reason,
                wait=wait,
            )
            try:
                on_retry(info)
            except Exception as exc:  # a broken metrics hook must not break the call
                log.error("waldur.retry_hook_failed", error=type(exc).__name__)

    return Retrying(
        stop=stop_after_attempt(policy.attempts) | stop_before_delay(max(policy.total - elapsed, 0.0)),
        wait=_FullJitterWait(policy, rng),
        retry=retry_if_exception(is_transient),
        before_sleep=before_sleep,
        sleep=sleep,
        reraise=True,
    )
