"""The fault matrix (issue 6 item 1): the daemon as a real process on the real RabbitMQ, 500 orders in flight
(Create orders of new resources on two offerings, plus Update and Terminate orders of existing resources), one
fault per case. Each case ends with the same check of what the storage engineer and Waldur see: every order
``done`` in Waldur, exactly one ``*_<order uuid>.json`` per order, Waldur never told ``done`` before the file
existed (checked all along), the newest all.json of each offering equal to a fresh ``sync``, and the token in no
file. Orders are announced as Mastermind announces them (one STOMP connection per message).
"""

from __future__ import annotations

import collections
import signal
import time
from pathlib import Path

import pytest

from tests.fixtures.brokers import Brokers
from tests.fixtures.daemon_process import (
    ConnectionKiller,
    Harness,
    HarnessFactory,
    OrderSpec,
    chattr_available,
    fill_up,
    immutable_directory,
    rabbitmq_app_stopped,
    tmpfs_mount,
    tmpfs_reason,
    wait_until,
)

pytestmark = pytest.mark.broker

ORDERS = 500


def mix(h: Harness) -> list[OrderSpec]:
    """500 orders: 440 Create (two offerings), 40 Update and 20 Terminate of distinct existing resources."""
    return h.order_mix(creates=ORDERS - 60, updates=40, terminates=20)


def thirds(specs: list[OrderSpec]) -> tuple[list[OrderSpec], list[OrderSpec], list[OrderSpec]]:
    a, b = len(specs) // 3, 2 * len(specs) // 3
    return specs[:a], specs[a:b], specs[b:]


def connected_events(h: Harness) -> int:
    return len(h.daemon.events("broker.connected"))


def test_broker_connections_killed_every_few_seconds(daemon_harness: HarnessFactory) -> None:
    h = daemon_harness()
    watch = h.watch_invariants()
    before = connected_events(h)
    with ConnectionKiller(h.vhost, period=2.5) as killer:
        stream = h.stream_in_background(mix(h))
        stream.join()
        # Keep killing while the daemon works through what was published.
        wait_until(lambda: killer.kills >= 4, 30)
    assert killer.kills >= 4, killer.errors
    assert watch() == []
    h.final_check()
    # The daemon noticed every kill and came back each time (the publisher's connections died too).
    assert len(h.daemon.events("broker.disconnected")) >= 2
    assert connected_events(h) - before >= 2
    assert h.daemon.events("reconcile.started")  # a pass after each reconnect


def test_rabbitmq_stopped_and_started(daemon_harness: HarnessFactory, brokers: Brokers) -> None:
    h = daemon_harness()
    watch = h.watch_invariants()
    stream = h.stream_in_background(mix(h))
    h.wait_submitted(ORDERS // 3)
    with rabbitmq_app_stopped(brokers):
        # While the broker is down the publisher (like Waldur) cannot send; the daemon keeps retrying.
        h.daemon.wait_event("broker.disconnected", timeout=60)
        time.sleep(3)
    stream.join()
    assert watch() == []
    h.final_check()
    assert h.daemon.alive
    reconnected = h.daemon.events("broker.connected")
    assert len(reconnected) >= 2 * 2  # both offerings, before and after


def test_daemon_sigkilled_and_restarted_three_times(daemon_harness: HarnessFactory) -> None:
    h = daemon_harness()
    watch = h.watch_invariants()
    stream = h.stream_in_background(mix(h))
    for fraction in (0.2, 0.45, 0.7):
        h.wait_submitted(int(ORDERS * fraction))
        assert h.daemon.kill() == -signal.SIGKILL
        h.daemon.start()  # READY again: mirror filled, first all.json, connected, reconciled
    stream.join()
    assert watch() == []
    h.final_check()
    assert len(h.daemon.runs) == 4
    for run in h.daemon.runs:
        assert run.ready


def test_waldur_returning_5xx_on_30_percent_of_calls(daemon_harness: HarnessFactory) -> None:
    h = daemon_harness()
    watch = h.watch_invariants()
    h.fake.set_faults(error_rate=0.3)
    h.stream(mix(h))
    h.wait_all_done(timeout=240)  # with the faults still on
    faults = collections.Counter(r.status for r in h.fake.requests if r.fault == "error")
    assert sum(faults.values()) > 100, faults
    assert h.daemon.events("waldur.retry")
    assert watch() == []
    h.final_check()


def test_waldur_hanging_past_the_timeout(daemon_harness: HarnessFactory) -> None:
    timeout = 1.0
    h = daemon_harness(daemon={"retry": {"timeout": timeout, "attempts": 6, "max_wait": 0.05, "total": 20}})
    watch = h.watch_invariants()
    h.fake.set_faults(hang_rate=0.02, hang_seconds=timeout * 3)
    h.stream(mix(h))
    h.wait_all_done(timeout=240)
    hangs = [r for r in h.fake.requests if r.fault == "hang"]
    assert len(hangs) >= 5
    reasons = collections.Counter(r.get("reason") for r in h.daemon.events("waldur.retry"))
    assert reasons["ReadTimeout"] >= 1, reasons
    assert watch() == []
    h.final_check()


def _held_back(h: Harness, second: list[OrderSpec], error_fragment: str) -> None:
    """While the output directory refuses writes: the order files fail (``order.write_failed``), no order of the
    batch is done, and the broker still holds every one of their messages (nothing was acknowledged)."""
    failures_before = len(h.daemon.events("order.write_failed"))
    batch = h.stream(second)
    h.daemon.wait_event("order.write_failed", count=failures_before + 8, timeout=90)
    failed = h.daemon.events("order.write_failed")[failures_before:]
    assert all(error_fragment in r["error"] for r in failed), failed[:3]
    states = collections.Counter(h.states(batch).values())
    assert states["done"] == 0, states
    assert states["executing"] > 0, states  # approved, waiting for the disk
    assert h.queue_depth() == len(batch)
    assert not h.check_done_has_file()


def _quiet(h: Harness) -> None:
    """Everything submitted so far is done and the broker holds nothing for the daemon."""
    h.wait_all_done()
    assert wait_until(lambda: h.queue_depth() == 0, 60, 0.5)


def test_output_directory_read_only_for_a_while(daemon_harness: HarnessFactory) -> None:
    h = daemon_harness()
    reason = chattr_available(h.root)
    if reason is not None:
        pytest.skip(f"cannot make a directory read-only for root here: {reason}")
    watch = h.watch_invariants()
    first, second, third = thirds(mix(h))
    h.stream(first)
    _quiet(h)
    directories = [h.out_dir(o.slug) for o in h.offerings]
    for directory in directories:
        assert directory.is_dir()
    with immutable_directory(directories[0]), immutable_directory(directories[1]):
        _held_back(h, second, "PermissionError")
        time.sleep(2)
        assert h.queue_depth() == len(second)
        assert collections.Counter(h.states(h.orders[len(first) :]).values())["done"] == 0
    h.stream(third)
    assert watch() == []
    h.final_check()


def test_disk_full_on_a_tiny_tmpfs(daemon_harness: HarnessFactory, tmp_path: Path) -> None:
    reason = tmpfs_reason(tmp_path)
    if reason is not None:
        pytest.skip(f"no tmpfs for a full disk: {reason}")
    mount = tmp_path / "scenario-tmpfs"
    with tmpfs_mount(mount, "24m"):
        h = daemon_harness(output_root=mount)
        watch = h.watch_invariants()
        first, second, third = thirds(mix(h))
        h.stream(first)
        _quiet(h)
        filler = fill_up(mount)
        try:
            _held_back(h, second, "No space left on device")
        finally:
            filler.unlink()
        h.stream(third)
        assert watch() == []
        h.final_check()
        assert h.daemon.terminate() == 0
