"""From a delivery to its effect, and only then the acknowledgement (events spec §1–3).

The transport's receiver thread only calls `submit`, which parses (pure, cannot raise) and queues. Workers run the
handlers: events for the same resource go to the same lane, so they are handled in arrival order; different
resources run in parallel. Each delivery is acknowledged only after its effect is durable, or after it was judged
not actionable (dead letter, ignored type, skipped order).
"""

from __future__ import annotations

import base64
import json
import os
import queue
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import structlog

from cscs_storage_daemon.events import (
    DeadLetter,
    Event,
    IgnoredEvent,
    OrderEvent,
    ResourceEvent,
    SyncEvent,
    parse_event,
    preview,
)
from cscs_storage_daemon.gateway import WaldurError, WaldurRejected, WaldurUnavailable
from cscs_storage_daemon.metrics import Metrics
from cscs_storage_daemon.processor import Processor, WriteFailure
from cscs_storage_daemon.runtime import OfferingRuntime
from cscs_storage_daemon.transports.base import Delivery

log = structlog.get_logger("cscs_storage_daemon.dispatcher")

SAFE_HEADERS = frozenset(
    {"destination", "message-id", "x-message-id", "subscription", "redelivered", "content-type", "content-length"}
)


class DeadLetterLog:
    """`dead-letter.jsonl` in the state directory: one line per rejected delivery, body kept whole (base64)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.count = 0

    def append(self, delivery: Delivery, reason: str, detail: str, when: str) -> None:
        record = {
            "time": when,
            "transport": delivery.transport,
            "destination": delivery.destination,
            "headers": {k: v for k, v in delivery.headers.items() if k in SAFE_HEADERS},
            "reason": reason,
            "detail": detail,
            "body_base64": base64.b64encode(delivery.body).decode("ascii"),
        }
        line = json.dumps(record, ensure_ascii=True) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="ascii") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
            self.count += 1


@dataclass(slots=True)
class Inbound:
    delivery: Delivery
    offering: OfferingRuntime | None
    event: Event | DeadLetter
    received: float  # monotonic


Route = Callable[[Delivery], tuple[OfferingRuntime | None, bool]]  # → (offering, legacy naming)
TaskScope = Callable[[Delivery], AbstractContextManager[object]]  # brackets the handling of one delivery (capture)


class Dispatcher:
    def __init__(
        self,
        *,
        processor: Processor,
        route: Route,
        offerings: Mapping[str, OfferingRuntime],
        dead_letters: DeadLetterLog,
        metrics: Metrics,
        request_reconcile: Callable[[OfferingRuntime | None, str], None],
        workers: int = 4,
        write_retry_delay: float = 5.0,
        inline: bool = False,
    ) -> None:
        self.processor = processor
        self.route = route
        self.offerings = offerings  # by offering uuid hex: the fallback when the destination names none
        self.dead_letters = dead_letters
        self.metrics = metrics
        self.request_reconcile = request_reconcile
        self.write_retry_delay = write_retry_delay
        self.inline = inline
        self.task_scope: TaskScope | None = None  # set by the capture: tags what a delivery's handling does
        # SimpleQueue: put and get in C, one semaphore; a Queue's Python-level Condition cost more per event.
        self._lanes: list[queue.SimpleQueue[Inbound | None]] = [queue.SimpleQueue() for _ in range(max(1, workers))]
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._in_flight = 0
        self._count_lock = threading.Lock()
        self.handled = 0

    # -- intake (transport thread) -----------------------------------------------------------------------------

    def submit(self, delivery: Delivery) -> None:
        """Called on the transport's receiver thread: parse, pick a lane, queue. Never raises, never blocks."""
        try:
            if self._stopping.is_set():
                delivery.nack()
                return
            offering, legacy = self.route(delivery)
            event = parse_event(delivery.body, destination=delivery.destination, legacy=legacy)
            item = Inbound(delivery, offering, event, time.monotonic())
        except Exception as exc:  # a bug in routing must not reach the transport thread
            log.exception("event.intake_failed", destination=delivery.destination)
            item = Inbound(delivery, None, DeadLetter("intake_error", repr(exc)[:200]), time.monotonic())
        with self._count_lock:
            self._in_flight += 1
        if self.inline:
            self._run(item)
            return
        lane = zlib.crc32(item.event.key.encode()) % len(self._lanes)
        self._lanes[lane].put(item)

    # -- workers -----------------------------------------------------------------------------------------------

    def start(self) -> None:
        for index, lane in enumerate(self._lanes):
            thread = threading.Thread(target=self._work, args=(lane,), name=f"worker-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    @property
    def alive(self) -> bool:
        return self.inline or all(t.is_alive() for t in self._threads)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _work(self, lane: queue.SimpleQueue[Inbound | None]) -> None:
        while True:
            item = lane.get()
            if item is None:
                return
            self._run(item)

    def _run(self, item: Inbound) -> None:
        scope = self.task_scope(item.delivery) if self.task_scope is not None else nullcontext()
        try:
            with scope:
                try:
                    self._handle(item)
                except Exception:
                    log.exception("event.failed", destination=item.delivery.destination)
                    item.delivery.ack()  # reconciliation is the safety net; a poison event must not loop forever
        finally:
            with self._count_lock:
                self._in_flight -= 1
                self.handled += 1

    def _handle(self, item: Inbound) -> None:
        delivery, event = item.delivery, item.event
        event_id = delivery.headers.get("x-message-id") or delivery.headers.get("message-id") or ""
        if isinstance(event, DeadLetter):
            self._dead_letter(delivery, event)
            return
        self.metrics.events_received.labels(event.object_type).inc()
        offering = item.offering or self._offering_for(event)
        ids: dict[str, str] = {"event_id": event_id, "object_type": event.object_type}
        if isinstance(event, OrderEvent):
            ids["order_uuid"] = event.order_uuid
        elif isinstance(event, ResourceEvent):
            ids["resource_uuid"] = event.resource_uuid
        # Bound for the handling, then reset to what they were (a token per key: cheaper than bound_contextvars,
        # which reads the whole context first).
        tokens = structlog.contextvars.bind_contextvars(**ids)
        try:
            if offering is None:
                log.warning("event.unknown_offering", destination=delivery.destination)
                self.metrics.events_ignored.labels(event.object_type).inc()
                delivery.ack()
                return
            self._process(item, offering, event)
        finally:
            structlog.contextvars.reset_contextvars(**tokens)

    def _process(self, item: Inbound, offering: OfferingRuntime, event: Event) -> None:
        delivery = item.delivery
        try:
            if isinstance(event, OrderEvent):
                outcome = self.processor.handle_order(offering, event.order_uuid, event.order_state)
                if outcome.outcome in {"done", "written"} and outcome.file_name:
                    self.metrics.event_to_file_seconds.observe(time.monotonic() - item.received)
            elif isinstance(event, ResourceEvent):
                self.processor.handle_resource(offering, event.resource_uuid)
            elif isinstance(event, SyncEvent):
                self.request_reconcile(offering, "offering_resources_sync")
            elif isinstance(event, IgnoredEvent):
                log.debug("event.ignored")
                self.metrics.events_ignored.labels(event.object_type).inc()
        except WaldurUnavailable as exc:
            # Not lost: Waldur's own order state is the truth, and an early reconciliation pass retries it.
            log.warning("event.deferred", reason=str(exc)[:200])
            self.request_reconcile(offering, "waldur_unavailable")
        except WriteFailure:
            # Not acknowledged: the broker redelivers it after a pause, never in a tight loop.
            self._stopping.wait(self.write_retry_delay)
            delivery.nack()
            return
        except WaldurRejected as exc:
            log.error("event.rejected_by_waldur", status=exc.status, error=str(exc)[:300])
        except WaldurError as exc:
            log.error("event.waldur_error", error=str(exc)[:300])
            self.request_reconcile(offering, "waldur_error")
        delivery.ack()

    def _offering_for(self, event: Event) -> OfferingRuntime | None:
        if event.offering_uuid is not None:
            return self.offerings.get(event.offering_uuid)
        return next(iter(self.offerings.values())) if len(self.offerings) == 1 else None

    def _dead_letter(self, delivery: Delivery, dead: DeadLetter) -> None:
        log.warning(
            "event.dead_lettered",
            destination=delivery.destination,
            reason=dead.reason,
            detail=dead.detail,
            body_preview=preview(delivery.body),
        )
        self.metrics.events_dead_lettered.labels(dead.reason).inc()
        try:
            self.dead_letters.append(delivery, dead.reason, dead.detail, time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        except OSError as exc:
            log.error("event.dead_letter_write_failed", error=str(exc))
            delivery.nack()
            return
        delivery.ack()

    # -- shutdown ----------------------------------------------------------------------------------------------

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop taking events and finish those in flight (bounded by `timeout`). True if all finished."""
        self._stopping.set()
        for lane in self._lanes:
            lane.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return all(not t.is_alive() for t in self._threads)
