"""The reconciliation pass scheduler (events spec §4): at start, after every (re)connection, on
`offering_resources_sync`, every `reconcile_interval`, and early (backing off) while Waldur is failing.

It is what makes a missed event harmless: every resource page is listed again, and every open order is processed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

import structlog

from cscs_storage_daemon.gateway import WaldurError
from cscs_storage_daemon.metrics import Metrics
from cscs_storage_daemon.processor import Processor, WriteFailure
from cscs_storage_daemon.runtime import OfferingRuntime

log = structlog.get_logger("cscs_storage_daemon.reconciler")

EARLY_RETRY_FIRST = 5.0
EARLY_RETRY_MAX = 60.0


class Reconciler:
    def __init__(
        self,
        offerings: Iterable[OfferingRuntime],
        *,
        processor: Processor,
        metrics: Metrics,
        interval: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.offerings = {o.slug: o for o in offerings}
        self.processor = processor
        self.metrics = metrics
        self.interval = interval
        self._monotonic = monotonic
        self._cond = threading.Condition()
        self._requested: dict[str, str] = {}
        self._next_periodic = monotonic() + interval
        self._retry_delay: dict[str, float] = {}
        self._retry_at: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.passes = 0
        self.last_tick = time.monotonic()

    def request(self, offering: OfferingRuntime | None, reason: str) -> None:
        """Ask for a pass soon (one offering, or all with None). Repeated requests coalesce."""
        with self._cond:
            targets = [offering.slug] if offering is not None else list(self.offerings)
            for slug in targets:
                if reason in {"waldur_unavailable", "waldur_error"}:
                    # Early retry, but not before the back-off that a failing Waldur has earned.
                    delay = self._retry_delay.get(slug, EARLY_RETRY_FIRST)
                    self._retry_at.setdefault(slug, self._monotonic() + delay)
                else:
                    self._requested.setdefault(slug, reason)
            self._cond.notify()

    def run_once(self, offering: OfferingRuntime, reason: str) -> bool:
        """One pass over one offering, now, on the caller's thread. True on success."""
        log.info("reconcile.started", offering=offering.slug, reason=reason)
        try:
            self.processor.reconcile(offering, stop=self._stop)
        except (WaldurError, WriteFailure) as exc:
            delay = min(EARLY_RETRY_MAX, self._retry_delay.get(offering.slug, EARLY_RETRY_FIRST / 2) * 2)
            with self._cond:
                self._retry_delay[offering.slug] = delay
                self._retry_at[offering.slug] = self._monotonic() + delay
            log.warning("reconcile.failed", offering=offering.slug, error=str(exc)[:300], retry_in=delay)
            self.metrics.reconciliations.labels("failed").inc()
            return False
        with self._cond:
            self._retry_delay.pop(offering.slug, None)
        self.passes += 1
        self.metrics.reconciliations.labels("ok").inc()
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _due(self) -> list[tuple[str, str]]:
        now = self._monotonic()
        due = dict(self._requested)
        self._requested.clear()
        for slug, at in list(self._retry_at.items()):
            if now >= at:
                due.setdefault(slug, "retry")
                del self._retry_at[slug]
        if now >= self._next_periodic:
            self._next_periodic = now + self.interval
            for slug in self.offerings:
                due.setdefault(slug, "interval")
        return list(due.items())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.last_tick = time.monotonic()
            with self._cond:
                due = self._due()
                if not due:
                    wakeups = [self._next_periodic, *self._retry_at.values()]
                    self._cond.wait(timeout=max(0.05, min(min(wakeups) - self._monotonic(), 5.0)))
                    continue
            for slug, reason in due:
                if self._stop.is_set():
                    return
                try:
                    self.run_once(self.offerings[slug], reason)
                except Exception:
                    log.exception("reconcile.crashed", offering=slug)

    def request_stop(self) -> None:
        """Take no further order: a pass in progress ends after the order in hand (first step of a shutdown)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def stop(self, timeout: float = 10.0) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)
