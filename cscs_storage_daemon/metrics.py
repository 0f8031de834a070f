"""Prometheus metrics of the daemon (events spec §7). Labels stay low-cardinality: never a uuid.

One `Metrics` object per process (tests make their own, each with its own registry).
"""

from __future__ import annotations

from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Histogram


class _CachedLabels:
    """`labels(*values)` from a dict once a child exists: prometheus_client validates the values and takes a lock
    on every call, several microseconds on a path taken a few times per event. Children are never removed here."""

    _children_by_values: dict[tuple[Any, ...], Any] | None = None

    def labels(self, *values: Any, **named: Any) -> Any:
        if named:
            return super().labels(*values, **named)  # type: ignore[misc]
        cache = self._children_by_values
        if cache is None:
            cache = self._children_by_values = {}
        child = cache.get(values)
        if child is None:
            child = cache[values] = super().labels(*values)  # type: ignore[misc]
        return child


class Counter(_CachedLabels, prometheus_client.Counter):
    pass


class Gauge(_CachedLabels, prometheus_client.Gauge):
    pass


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events_received = Counter(
            "cscs_events_received_total", "Events received from the broker", ["object_type"], registry=r
        )
        self.events_dead_lettered = Counter(
            "cscs_events_dead_lettered_total", "Events dead-lettered as malformed", ["reason"], registry=r
        )
        self.events_ignored = Counter(
            "cscs_events_ignored_total",
            "Valid events of a type the daemon does not act on",
            ["object_type"],
            registry=r,
        )
        self.orders_processed = Counter(
            "cscs_orders_processed_total", "Orders processed", ["order_type", "outcome"], registry=r
        )
        self.event_to_file_seconds = Histogram(
            "cscs_event_to_file_seconds",
            "Time from an event's arrival to its order file being durable",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.waldur_retries = Counter(
            "cscs_waldur_request_retries_total", "Waldur requests retried", ["reason"], registry=r
        )
        self.waldur_requests = Counter("cscs_waldur_requests_total", "Waldur requests made", ["outcome"], registry=r)
        self.broker_reconnects = Counter(
            "cscs_broker_reconnects_total", "Broker reconnections", ["transport"], registry=r
        )
        self.broker_connected = Gauge("cscs_broker_connected", "1 while the broker connection is up", registry=r)
        self.last_snapshot = Gauge(
            "cscs_last_snapshot_timestamp_seconds",
            "Last successful all.json per offering",
            ["offering"],
            registry=r,
        )
        self.snapshots_written = Counter(
            "cscs_snapshots_written_total", "all.json files written", ["offering"], registry=r
        )
        self.mirror_size = Gauge("cscs_mirror_resources", "Resources in the mirror", ["offering"], registry=r)
        self.invalid_resources = Gauge(
            "cscs_invalid_resources",
            "Resources currently invalid (skipped or stale)",
            ["offering"],
            registry=r,
        )
        self.invalid_resource_reports = Counter(
            "cscs_invalid_resource_reports_total",
            "Invalid resources reported",
            ["offering", "kind"],
            registry=r,
        )
        self.write_failures = Counter(
            "cscs_write_failures_total", "Output file writes that failed", ["kind"], registry=r
        )
        self.reconciliations = Counter("cscs_reconciliations_total", "Reconciliation passes", ["outcome"], registry=r)
