"""all.json regeneration on a debounced timer (events spec §4).

One timer thread for every offering; the debounce decisions are the pure rules of `debounce.py`. A regeneration
of one offering never overlaps another of the same offering, and unchanged content is not rewritten except on the
heartbeat.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime

import structlog

from cscs_storage_daemon.debounce import Debouncer, DebounceRules
from cscs_storage_daemon.envelope import (
    RenderedObjects,
    content_key,
    render_pieces,
    snapshot_envelope,
    snapshot_file_name,
)
from cscs_storage_daemon.metrics import Metrics
from cscs_storage_daemon.runtime import OfferingRuntime
from cscs_storage_daemon.stamps import Stamps

log = structlog.get_logger("cscs_storage_daemon.snapshots")


class SnapshotScheduler:
    def __init__(
        self,
        offerings: Iterable[OfferingRuntime],
        *,
        rules: DebounceRules,
        stamps: Stamps,
        metrics: Metrics,
        on_written: Callable[[OfferingRuntime, datetime], None] = lambda _o, _d: None,
    ) -> None:
        self.offerings = {o.slug: o for o in offerings}
        self.rules = rules
        self.stamps = stamps
        self.metrics = metrics
        self.on_written = on_written
        self._debouncers = {slug: Debouncer(rules) for slug in self.offerings}
        self._last_key: dict[str, bytes] = {}
        self._locks = {slug: threading.Lock() for slug in self.offerings}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_tick = time.monotonic()
        self.writes = 0
        # Rendered storage objects kept between regenerations (`RenderedObjects`): a regeneration renders only what
        # changed since the last one, at the cost of the rendered feed in memory. Off by default (the daemon's
        # regenerations run on the timer thread, at most once per quiet period); the replay turns it on.
        self._rendered: dict[str, RenderedObjects] | None = None

    @property
    def keep_rendered(self) -> bool:
        return self._rendered is not None

    @keep_rendered.setter
    def keep_rendered(self, keep: bool) -> None:
        self._rendered = {slug: RenderedObjects() for slug in self.offerings} if keep else None

    def _now(self) -> float:
        return self.stamps.clock.monotonic()

    def changed(self, offering: OfferingRuntime) -> None:
        with self._cond:
            self._debouncers[offering.slug].changed(self._now())
            self._cond.notify()

    def pending(self, slug: str) -> bool:
        with self._cond:
            return self._debouncers[slug].pending

    def regenerate(self, offering: OfferingRuntime, *, force: bool = False) -> bool:
        """Build and (if changed, forced or the heartbeat is due) write all.json now. Returns True if written."""
        slug = offering.slug
        with self._locks[slug]:
            with self._cond:
                debouncer = self._debouncers[slug]
                taken = debouncer.started()
            now = self._now()
            with self.stamps.section():  # the reading and the mirror it dates, as one step (capture / replay)
                reading = self.stamps.for_snapshot(slug)
                objects = offering.mirror.storage_objects()
            local = reading.astimezone(offering.zone)
            document = snapshot_envelope(objects, date=local)
            prepared = self._rendered[slug].prepare(document) if self._rendered is not None else None
            key = prepared.key if prepared is not None else content_key(document)
            with self._cond:
                heartbeat = debouncer.heartbeat_due(now)
            unchanged = self._last_key.get(slug) == key
            if not force and not heartbeat and unchanged:
                with self._cond:
                    debouncer.finished(now, wrote=False)
                log.debug("snapshot.unchanged", offering=slug)
                return False
            name = snapshot_file_name(local)
            try:
                pieces = prepared.pieces() if prepared is not None else render_pieces(document)
                offering.writer.write_pieces(name, pieces)
                pruned = offering.writer.prune_snapshots(offering.snapshot_retention)
            except OSError as exc:
                with self._cond:
                    debouncer.failed(taken, now)
                self.metrics.write_failures.labels("snapshot").inc()
                log.error("snapshot.write_failed", offering=slug, file=name, error=f"{type(exc).__name__}: {exc}")
                return False
            with self._cond:
                debouncer.finished(now, wrote=True)
            self._last_key[slug] = key
            self.writes += 1
            self.metrics.snapshots_written.labels(slug).inc()
            self.metrics.last_snapshot.labels(slug).set(reading.timestamp())
            log.info(
                "snapshot.written",
                offering=slug,
                file=name,
                resources=len(document["result"]["storageResources"]),
                pruned=len(pruned),
                heartbeat=unchanged,
            )
            self.on_written(offering, reading)
            return True

    # -- timer thread ------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="snapshot-timer", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.last_tick = time.monotonic()
            with self._cond:
                now = self._now()
                due = [slug for slug, d in self._debouncers.items() if d.is_due(now)]
                if not due:
                    times = [t for d in self._debouncers.values() if (t := d.due_at()) is not None]
                    wait = min(times) - now if times else 5.0
                    self._cond.wait(timeout=max(0.01, min(wait, 5.0)))
                    continue
            for slug in due:
                try:
                    self.regenerate(self.offerings[slug])
                except Exception:
                    log.exception("snapshot.failed", offering=slug)
                    time.sleep(0.5)

    def stop(self, *, flush: bool = True, timeout: float = 10.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        if flush:
            for slug, offering in self.offerings.items():
                if self.pending(slug):
                    self.regenerate(offering)
