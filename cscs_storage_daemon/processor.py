"""Order, resource and sync handling (events spec §3) — the imperative shell around the pure core.

Every call that reaches here has one job: make the storage side match Waldur for one order or one resource,
durably, exactly once. The order file is fsynced and recorded in the ledger before anything is acknowledged.
"""

from __future__ import annotations

import contextvars
import threading
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from cscs_storage_daemon.envelope import order_envelope, order_file_name, render
from cscs_storage_daemon.events import SKIPPED_ORDER_STATES, normalise_uuid
from cscs_storage_daemon.gateway import WaldurRejected
from cscs_storage_daemon.ledger import OrderLedger
from cscs_storage_daemon.mapping import InvalidResource, apply_order_changes, map_resource
from cscs_storage_daemon.metrics import Metrics
from cscs_storage_daemon.mirror import Change
from cscs_storage_daemon.runtime import OfferingRuntime
from cscs_storage_daemon.stamps import Stamps

log = structlog.get_logger("cscs_storage_daemon.processor")

ORDER_TYPES = {"Create": "create", "Update": "update", "Terminate": "terminate"}
RECONCILE_ORDER_STATES = ("pending-provider", "executing")


class WriteFailure(Exception):
    """The output directory refused a write (read-only, full): the event must not be acknowledged."""


@dataclass(frozen=True, slots=True)
class OrderOutcome:
    outcome: str  # done | erred | written | skipped | waiting | gone | foreign
    order_type: str | None = None
    file_name: str | None = None


class Processor:
    def __init__(
        self,
        *,
        ledger: OrderLedger,
        stamps: Stamps,
        metrics: Metrics,
        auto_approve: bool = True,
        complete_orders: bool = True,
        on_mirror_change: Callable[[OfferingRuntime], None] = lambda _o: None,
    ) -> None:
        self.ledger = ledger
        self.stamps = stamps
        self.metrics = metrics
        self.auto_approve = auto_approve
        self.complete_orders = complete_orders
        self.on_mirror_change = on_mirror_change
        # The same order can arrive from an event and a reconciliation pass at once: one at a time per order.
        self._order_locks = [threading.Lock() for _ in range(64)]

    # -- resources ---------------------------------------------------------------------------------------------

    def refresh(self, offering: OfferingRuntime, raw: Mapping[str, Any]) -> Change:
        """Put the current Waldur JSON of one resource into the mirror and report it if invalid."""
        change = offering.mirror.apply(raw)
        self._after_change(offering, [change])
        return change

    def _after_change(self, offering: OfferingRuntime, changes: list[Change], *, changed: bool = False) -> None:
        for change in changes:
            if change.error is not None and change.new_error:
                kind = "stale" if change.stale else "skipped"
                log.error(
                    "resource.invalid",
                    offering=offering.slug,
                    resource_uuid=change.uuid,
                    field=change.error.field,
                    error=change.error.message,
                    served=kind,
                )
                self.metrics.invalid_resource_reports.labels(offering.slug, kind).inc()
        self.metrics.mirror_size.labels(offering.slug).set(len(offering.mirror))
        self.metrics.invalid_resources.labels(offering.slug).set(offering.mirror.invalid_count)
        if changed or any(change.changed for change in changes):
            self.on_mirror_change(offering)

    def handle_resource(self, offering: OfferingRuntime, resource_uuid: str) -> None:
        try:
            raw = offering.gateway.get_resource(resource_uuid)
        except WaldurRejected as exc:
            if exc.status == 404:
                if offering.mirror.remove(resource_uuid):
                    log.info("resource.removed", offering=offering.slug, resource_uuid=resource_uuid)
                    self._after_change(offering, [], changed=True)
                return
            raise
        if normalise_uuid(raw.get("offering_uuid")) not in (None, offering.uuid):
            log.warning("resource.foreign_offering", offering=offering.slug, resource_uuid=resource_uuid)
            return
        self.refresh(offering, raw)
        log.info("resource.updated", offering=offering.slug, resource_uuid=resource_uuid, state=raw.get("state"))

    def reconcile(self, offering: OfferingRuntime, *, stop: threading.Event | None = None) -> int:
        """List every resource page (refresh the mirror) and process every open order. Returns orders handled.
        Once `stop` is set (SIGTERM), no further order is taken: the one in hand is finished, the rest waits."""
        changes = offering.read_all()
        expired = offering.mirror.expire_removed()
        if expired:
            log.info("resource.expired", offering=offering.slug, count=len(expired))
        self._after_change(offering, changes, changed=bool(expired))
        orders = offering.gateway.list_orders(offering.uuid, RECONCILE_ORDER_STATES)
        for handled, order in enumerate(orders):
            if stop is not None and stop.is_set():
                log.info("reconcile.stopped", offering=offering.slug, handled=handled, open_orders=len(orders))
                return handled
            order_uuid = normalise_uuid(order.get("uuid"))
            if order_uuid is None:
                log.error("order.invalid_uuid", offering=offering.slug, uuid=str(order.get("uuid"))[:64])
                continue
            with structlog.contextvars.bound_contextvars(order_uuid=order_uuid, source="reconcile"):
                self.handle_order(offering, order_uuid, None, order=order)
        log.info("reconcile.finished", offering=offering.slug, resources=len(offering.mirror), open_orders=len(orders))
        return len(orders)

    # -- orders ------------------------------------------------------------------------------------------------

    def handle_order(
        self,
        offering: OfferingRuntime,
        order_uuid: str,
        state_hint: str | None,
        *,
        order: Mapping[str, Any] | None = None,
    ) -> OrderOutcome:
        if state_hint in SKIPPED_ORDER_STATES:
            log.debug("order.skipped", state=state_hint)
            return OrderOutcome("skipped")
        with self._order_locks[zlib.crc32(order_uuid.encode()) % len(self._order_locks)]:
            # `_execute` binds the order's resource and type for its own lines: in a copy of the context, so they
            # are never the next event's (cheaper than reading the context before and restoring it after).
            return contextvars.copy_context().run(self._handle_order, offering, order_uuid, order)

    def _handle_order(
        self, offering: OfferingRuntime, order_uuid: str, order: Mapping[str, Any] | None
    ) -> OrderOutcome:
        record = self.ledger.get(order_uuid)
        if record is not None and record.completed:
            log.debug("order.already_completed", outcome=record.outcome)
            return OrderOutcome("skipped", record.order_type, record.file_name)
        gateway = offering.gateway
        try:
            current = dict(order) if order is not None else gateway.get_order(order_uuid)
        except WaldurRejected as exc:
            if exc.status == 404:
                log.warning("order.not_found")
                return OrderOutcome("gone")
            raise
        if normalise_uuid(current.get("offering_uuid")) not in (None, offering.uuid):
            log.warning("order.foreign_offering", order_offering=str(current.get("offering_uuid"))[:64])
            return OrderOutcome("foreign")
        state = current.get("state")
        if state == "pending-provider":
            if not self.auto_approve:
                log.info("order.awaiting_approval")
                return OrderOutcome("waiting")
            try:
                gateway.approve_order(order_uuid)
            except WaldurRejected as exc:
                if exc.status != 409:  # 409: someone else moved it on; read where it is now
                    raise
                current = gateway.get_order(order_uuid)
                state = current.get("state")
            else:
                # Waldur answers 200 only for pending-provider → executing; the rest of the order is unchanged.
                log.info("order.approved")
                state = "executing"
        if state != "executing":
            if state == "done" and record is not None and record.written and not record.completed:
                # Interrupted between Waldur's `done` and the ledger's: only the ledger's step is left.
                self._completed(offering, order_uuid, record.order_type, "done")
                log.info("order.completion_recorded")
                return OrderOutcome("done", record.order_type, record.file_name)
            log.info("order.not_executing", state=str(state)[:40])
            return OrderOutcome("skipped")
        return self._execute(offering, order_uuid, current)

    def _execute(self, offering: OfferingRuntime, order_uuid: str, order: Mapping[str, Any]) -> OrderOutcome:
        gateway = offering.gateway
        order_type = ORDER_TYPES.get(str(order.get("type")))
        resource_uuid = normalise_uuid(order.get("marketplace_resource_uuid"))
        if order_type is None or resource_uuid is None:
            message = f"order {order_uuid} has an unusable type or resource uuid"
            log.error("order.unusable", type=str(order.get("type"))[:40])
            gateway.set_order_erred(order_uuid, message)
            self._completed(offering, order_uuid, order_type or "unknown", "erred")
            return OrderOutcome("erred", order_type)
        structlog.contextvars.bind_contextvars(resource_uuid=resource_uuid, order_type=order_type)
        raw = gateway.get_resource(resource_uuid)
        self.refresh(offering, raw)
        record = self.ledger.get(order_uuid)
        file_name = record.file_name if record is not None else None
        if record is None or record.written_at is None:
            source = apply_order_changes(raw, order) if order_type == "update" else raw
            try:
                storage = map_resource(source, offering.settings, warn=_warn)
            except InvalidResource as exc:
                log.error("order.invalid_resource", field=exc.field, error=exc.message)
                gateway.set_order_erred(order_uuid, str(exc))
                self._completed(offering, order_uuid, order_type, "erred")
                log.info("order.erred")
                return OrderOutcome("erred", order_type)
            if order_type == "terminate":
                storage = {**storage, "status": "removing"}
            reading = self.stamps.for_order(order_uuid)
            local = reading.astimezone(offering.zone)
            # A name recorded by an interrupted attempt is reused, so a retry never makes a second file.
            file_name = file_name or order_file_name(local, order_type, order_uuid)
            file_name = self.ledger.record_intent(
                order_uuid,
                order_type=order_type,
                offering=offering.slug,
                resource_uuid=resource_uuid,
                file_name=file_name,
            )
            try:
                offering.writer.write(file_name, render(order_envelope(storage, date=local)))
            except OSError as exc:
                self.metrics.write_failures.labels("order").inc()
                log.error("order.write_failed", file=file_name, error=f"{type(exc).__name__}: {exc.strerror or exc}")
                raise WriteFailure(str(exc)) from exc
            self.ledger.record_written(order_uuid, at=reading.isoformat())
            log.info("order.file_written", file=file_name, offering=offering.slug)
        if order_type == "create" and not raw.get("backend_id"):
            slug = raw.get("slug")
            if isinstance(slug, str) and slug:
                gateway.set_backend_id(resource_uuid, slug)
                log.info("resource.backend_id_set", backend_id=slug)
        if self.complete_orders:
            try:
                gateway.set_order_done(order_uuid)
            except WaldurRejected as exc:
                if exc.status != 409:
                    raise
                state = gateway.get_order(order_uuid).get("state")
                if state != "done":
                    log.warning("order.not_completable", state=str(state)[:40])
                    return OrderOutcome("written", order_type, file_name)
            self._completed(offering, order_uuid, order_type, "done")
            log.info("order.done")
            return OrderOutcome("done", order_type, file_name)
        return OrderOutcome("written", order_type, file_name)

    def _completed(self, offering: OfferingRuntime, order_uuid: str, order_type: str, outcome: str) -> None:
        self.ledger.record_completed(
            order_uuid,
            order_type=order_type,
            offering=offering.slug,
            outcome=outcome,
            at=self.stamps.clock.now().isoformat(),
        )
        self.metrics.orders_processed.labels(order_type, outcome).inc()


def _warn(event: str, fields: dict[str, Any]) -> None:
    log.warning(event, **fields)
