"""The metrics' children by label values, cached (`metrics._CachedLabels`)."""

from __future__ import annotations

from cscs_storage_daemon.metrics import Metrics


def test_a_child_is_made_once_and_counts_in_the_registry() -> None:
    metrics = Metrics()
    child = metrics.events_received.labels("order")
    assert metrics.events_received.labels("order") is child
    assert metrics.events_received.labels(object_type="order") is child  # prometheus_client's own lookup
    child.inc()
    metrics.events_received.labels("resource").inc(2)
    metrics.mirror_size.labels("capstor").set(7)
    sample = metrics.registry.get_sample_value
    assert sample("cscs_events_received_total", {"object_type": "order"}) == 1
    assert sample("cscs_events_received_total", {"object_type": "resource"}) == 2
    assert sample("cscs_mirror_resources", {"offering": "capstor"}) == 7


def test_children_are_per_metric_and_per_registry() -> None:
    first, second = Metrics(), Metrics()
    assert first.events_received.labels("order") is not second.events_received.labels("order")
    assert first.events_received.labels("order") is not first.events_ignored.labels("order")
