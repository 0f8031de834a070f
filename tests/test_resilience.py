"""Resilience of the running daemon (issue 3 item 7): a real ``cscs-storage-daemon run`` process on the real
RabbitMQ (STOMP), a fake Waldur that provisions it, orders announced exactly as Mastermind announces them, and
assertions on what the storage engineer (files) and Waldur (order states) see.

Every scenario ends with `Harness.final_check` (every order done, exactly one ``*_<order uuid>.json`` each, Waldur
never told done before the file existed, all.json equal to a fresh sync, the token in no file) unless it says
otherwise, and every harness greps the token at teardown.
"""

from __future__ import annotations

import collections
import json
import signal
import sqlite3
import uuid

import pytest
import yaml

from tests.fixtures.brokers import close_vhost_connections
from tests.fixtures.daemon_process import TOKEN_ENV, Harness, HarnessFactory, OrderSpec, wait_until

pytestmark = pytest.mark.broker


def done_count(h: Harness) -> int:
    return collections.Counter(h.states().values())["done"]


def ledger_rows(h: Harness) -> list[tuple[str, str | None, str | None, str | None]]:
    with sqlite3.connect(f"file:{h.state_dir / 'ledger.sqlite3'}?mode=ro", uri=True) as db:
        return list(db.execute("SELECT order_uuid, file_name, written_at, completed_at FROM orders"))


#: The daemon's transport in the scenarios that exercise the connection: STOMP over TCP and Web-STOMP.
TRANSPORTS = {
    "stomp": {"broker": {"port": 61613}},
    "web-stomp": {"broker": {"port": 15674, "websocket_path": "/ws"}},
}


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_sigkill_in_the_middle_of_200_orders_then_restart(daemon_harness: HarnessFactory, transport: str) -> None:
    h = daemon_harness(daemon=TRANSPORTS[transport])
    watch = h.watch_invariants()
    # Waldur answers a little slowly (20 ms a call), so orders pile up in the daemon's hands.
    h.fake.set_faults(slow_rate=1.0, delay=0.02)
    stream = h.stream_in_background(h.order_mix(creates=180, updates=12, terminates=8))
    h.wait_submitted(100)
    # Kill while orders are announced but not done yet (the daemon is working on them).
    assert wait_until(lambda: done_count(h) >= 20 and h.submitted - done_count(h) >= 10, 60, 0.01)
    assert h.daemon.kill() == -signal.SIGKILL  # no drain, no flush: whatever was half done stays half done
    h.daemon.start()
    stream.join()
    assert len(h.orders) == 200
    assert watch() == []
    h.final_check()
    # The ledger knows each order once, written and completed.
    rows = ledger_rows(h)
    assert len(rows) == 200
    assert all(file_name and written and completed for _o, file_name, written, completed in rows)
    assert h.daemon.runs[0].proc.returncode == -signal.SIGKILL
    assert h.daemon.events("daemon.ready", run=2)


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_all_broker_connections_closed_during_a_stream(daemon_harness: HarnessFactory, transport: str) -> None:
    h = daemon_harness(daemon=TRANSPORTS[transport])
    watch = h.watch_invariants()
    before = len(h.daemon.events("broker.connected"))
    stream = h.stream_in_background(h.order_mix(creates=200))
    closes = 0
    for threshold in (40, 90, 140):
        h.wait_submitted(threshold)
        # Every connection of the vhost, the daemon's and the publisher's (a bare `close_all_connections` would
        # only touch the default vhost "/").
        close_vhost_connections(h.vhost, "test")
        closes += 1
    stream.join()
    assert closes == 3
    h.final_check()
    assert watch() == []
    disconnected = h.daemon.events("broker.disconnected")
    reconnected = len(h.daemon.events("broker.connected")) - before
    assert len(disconnected) >= 3 and reconnected >= 3, (len(disconnected), reconnected)
    assert any(r.get("reason") == "reconnected" for r in h.daemon.events("reconcile.started"))
    assert h.daemon.runs[-1].index == 1  # the same process all along


def test_waldur_failing_30_percent_of_calls_with_5xx(daemon_harness: HarnessFactory) -> None:
    h = daemon_harness()
    watch = h.watch_invariants()
    h.fake.set_faults(error_rate=0.3)
    h.stream(h.order_mix(creates=180, updates=12, terminates=8))
    h.wait_all_done(timeout=180)  # every order completes while Waldur keeps failing
    assert sum(1 for r in h.fake.requests if r.fault == "error") > 50
    retries = h.daemon.events("waldur.retry")
    assert retries and {r["reason"] for r in retries} <= {"HTTP 500", "HTTP 502", "HTTP 503"}
    assert watch() == []
    h.final_check()


MALFORMED: list[bytes] = [
    b"not json",
    b"",
    b"\xff\xfe\x00garbage",
    b'{"object_type": "order", "order_uuid": "\xc3\x28"}',
    b"[1, 2]",
    b'"just a string"',
    b"null",
    b'{"object_type": "nope", "order_uuid": "0a1b2c3d4e5f40718293a4b5c6d7e8f9"}',
    b'{"object_type": 7}',
    b'{"order_uuid": "0a1b2c3d4e5f40718293a4b5c6d7e8f9", "order_state": "pending-provider"}',
    b'{"object_type": "order", "order_uuid": "zzz"}',
    b'{"object_type": "order", "order_uuid": null}',
    b'{"object_type": "order", "order_uuid": "0a1b2c3d4e5f40718293a4b5c6d7e8f9", "order_state": 5}',
    b'{"object_type": "order", "order_uuid": "0a1b2c3d4e5f40718293a4b5c6d7e8f9", "resource_uuid": "../../etc"}',
    b'{"object_type": "resource", "resource_uuid": 12}',
    b'{"object_type": "order", "offering_uuid": "x", "order_uuid": "0a1b2c3d4e5f40718293a4b5c6d7e8f9"}',
    b'{"object_type": "order", "order_uuid": "' + b"a" * 300_000 + b'"}',
    b"[" * 50_000 + b"]" * 50_000,
    b'{"object_type": "order", "order_uuid": "0a1b2c3d4e5f40718293a4b5c6d7e8f9"',
]


def test_malformed_bodies_are_dead_lettered_and_the_daemon_keeps_processing(daemon_harness: HarnessFactory) -> None:
    h = daemon_harness()
    offering = h.offerings[0].uuid
    rounds = 4
    specs = h.order_mix(creates=40)
    orders = []
    for round_ in range(rounds):
        for body in MALFORMED:
            h.publisher.publish(offering, body)
        # Well-formed but pointless: an order Waldur does not know, a type the daemon ignores.
        unknown = uuid.uuid4().hex
        h.publisher.publish(offering, json.dumps({"object_type": "order", "order_uuid": unknown}))
        h.publisher.publish(offering, json.dumps({"object_type": "user_role", "offering_uuid": offering}))
        orders.extend(h.stream(specs[round_ * 10 : (round_ + 1) * 10], threads=1))
    expected = rounds * len(MALFORMED)
    dead = h.state_dir / "dead-letter.jsonl"
    assert wait_until(lambda: dead.exists() and len(dead.read_text().splitlines()) >= expected, 60)
    lines = [json.loads(line) for line in dead.read_text().splitlines()]
    assert len(lines) == expected
    reasons = collections.Counter(line["reason"] for line in lines)
    assert set(reasons) >= {"not_utf8", "not_json", "not_object", "missing_object_type", "unknown_object_type"}
    assert set(reasons) >= {"bad_uuid", "bad_field"}
    assert all(line["body_base64"] is not None for line in lines)
    logged = h.daemon.events("event.dead_lettered")
    assert len(logged) == expected
    assert all(len(r["body_preview"].encode()) <= 4 * 200 for r in logged)
    assert len(h.daemon.events("order.not_found")) == rounds
    # Alive and healthy: the process runs, the watchdog keeps being fed, and orders after the garbage complete.
    watchdogs = h.daemon.current.notifications.count("WATCHDOG=1")
    h.final_check(orders)
    assert wait_until(lambda: h.daemon.current.notifications.count("WATCHDOG=1") > watchdogs, 10)
    assert not h.daemon.events("daemon.unhealthy")
    assert not h.daemon.events("event.failed")
    assert h.daemon.current.proc.poll() is None


def test_the_token_never_appears_in_a_log_line_or_a_file(daemon_harness: HarnessFactory) -> None:
    """Debug logging, Waldur failing in every way it can (5xx, 429, dropped connections), an invalid resource
    (its order erred with a message), dead letters, a reload and a stop: then grep everything the run wrote."""
    h = daemon_harness(daemon={"log": {"level": "debug"}})
    h.fake.set_faults(error_rate=0.1, throttle_rate=0.05, drop_rate=0.05, retry_after=0)
    orders = h.stream(h.order_mix(creates=30, updates=4, terminates=2))
    _resource, bad = h.fake.order_new_resource(h.offerings[0].uuid, slug="bad-perms", permissions="8888")
    h.publisher.publish(h.offerings[0].uuid, json.dumps({"object_type": "order", "order_uuid": bad["uuid"]}))
    for body in MALFORMED[:6]:
        h.publisher.publish(h.offerings[0].uuid, body)
    h.wait_all_done(orders, timeout=120)
    assert wait_until(lambda: h.fake.order_state(bad["uuid"]) == "erred", 60)
    h.fake.clear_faults()
    h.daemon.reload()
    h.daemon.wait_event("config.reloaded")
    h.final_check(orders)
    assert h.daemon.terminate() == 0
    # The daemon did authenticate with the token (Waldur answered, RabbitMQ let it in) ...
    assert any(r.status == 200 for r in h.fake.requests)
    assert h.daemon.events("broker.connected")
    assert h.daemon.events("waldur.retry") and h.daemon.events("event.dead_lettered")
    # ... and it is nowhere: stdout / stderr of the process, output and state directories (ledger, dead letters).
    assert (h.state_dir / "dead-letter.jsonl").exists() and (h.state_dir / "ledger.sqlite3").exists()
    written = [p for p in h.root.rglob("*") if p.is_file()]
    assert len(written) > len(orders) + 5
    assert h.files_containing_token() == []
    for path in written:
        assert h.token.encode() not in path.read_bytes(), path
    assert any(bad["uuid"] in p.read_text(errors="replace") for p in (h.root / "logs").glob("*.stdout"))


def test_sigterm_drains_and_exits_0(daemon_harness: HarnessFactory) -> None:
    h = daemon_harness()
    h.fake.set_faults(slow_rate=1.0, delay=0.02)  # so that work is in the daemon's hands when SIGTERM comes
    stream = h.stream_in_background(h.order_mix(creates=150))
    h.wait_submitted(60)
    assert wait_until(lambda: done_count(h) >= 10 and h.submitted - done_count(h) >= 10, 60, 0.01)
    assert h.daemon.terminate(timeout=90) == 0
    run = h.daemon.current
    events = [r.get("event") for r in run.log_records()]
    assert events[-1] == "daemon.stopped"
    assert events.index("daemon.stopping") < events.index("daemon.stopped")
    assert "order.done" in events[events.index("daemon.stopping") :]  # in-flight orders were finished
    assert "STOPPING=1" in run.notifications
    # Drained: whatever the daemon started, it finished - no order has its file without being done.
    counts = h.file_counts()
    states = h.states()
    half_done = [u for u, n in counts.items() if n and states.get(u) != "done"]
    assert half_done == []
    assert not [r for r in run.log_records() if r.get("level") in {"error", "critical"}]
    # Nothing was lost either: the next run takes the rest from the broker and from Waldur.
    stream.join()
    h.daemon.start()
    h.final_check()
    assert h.daemon.terminate() == 0


def test_sigterm_during_a_reconciliation_pass_stops_taking_orders(daemon_harness: HarnessFactory) -> None:
    """Waldur lost every event of 300 orders: only the reconciliation pass sees them. A SIGTERM in the middle of
    that pass finishes the order in hand and takes no further one; the next run does the rest, exactly once."""
    h = daemon_harness(existing=2)
    orders = [h.create_order(spec) for spec in h.order_mix(creates=300)]
    h.daemon.wait_event("order.approved", where=lambda r: r.get("source") == "reconcile", count=20)
    assert h.daemon.terminate(timeout=90) == 0
    records = h.daemon.current.log_records()
    stopping = next(i for i, r in enumerate(records) if r.get("event") == "daemon.stopping")
    late = [r for r in records[stopping:] if r.get("event") == "order.approved"]
    assert len(late) <= 1, f"{len(late)} orders approved after SIGTERM"
    assert [r.get("event") for r in records][-1] == "daemon.stopped"
    assert not [r for r in records if r.get("level") in {"error", "critical"}]
    states = h.states()
    assert [u for u, n in h.file_counts().items() if n and states[u] != "done"] == []
    assert collections.Counter(states.values())["pending-provider"] > 0
    h.daemon.start()
    h.final_check(orders)


def _break(config: dict[str, object], kind: str) -> str:
    """Make the config invalid; returns the key path the error must name."""
    offerings = config["offerings"]
    daemon = config["daemon"]
    assert isinstance(offerings, list) and isinstance(daemon, dict)
    if kind == "coefficients":
        offerings[1]["backend_settings"]["inode_hard_coefficient"] = 1.0
        return "offerings[1].backend_settings.inode_hard_coefficient"
    if kind == "unknown_key":
        daemon["auto_aprove"] = False
        return "daemon.auto_aprove"
    if kind == "snapshot":
        daemon["snapshot"] = {"quiet": 5, "max_wait": 1, "heartbeat": 3600}
        return "daemon.snapshot.max_wait"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["coefficients", "unknown_key", "snapshot", "unset_token_variable"])
def test_a_config_error_exits_78_before_anything_connects(daemon_harness: HarnessFactory, kind: str) -> None:
    h = daemon_harness(existing=2, start=False)
    if kind == "unset_token_variable":
        del h.daemon.extra_env[TOKEN_ENV]
        key = "offerings[0].waldur_api_token"
    else:
        config = yaml.safe_load(h.config_path.read_text())
        key = _break(config, kind)
        h.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    h.daemon.start(wait_ready=False)
    assert h.daemon.wait_exit(60) == 78
    run = h.daemon.current
    # One line per problem, naming the file and the key (the unset variable is a problem of both offerings).
    stderr = run.stderr.read_text().strip().splitlines()
    assert len(stderr) == (2 if kind == "unset_token_variable" else 1), stderr
    assert stderr[0].startswith("configuration error: ")
    assert all(f"{h.config_path}: " in line for line in stderr), stderr
    assert f"{h.config_path}: {key}: " in stderr[0], stderr[0]
    if kind == "unset_token_variable":
        assert TOKEN_ENV in stderr[0]
    assert run.stdout.read_text() == ""
    assert not run.ready
    # Nothing connected: no request (not even a TCP connection) reached Waldur, nothing was registered with
    # RabbitMQ, no directory was created.
    assert h.fake.requests == [] and h.fake.accepted_connections == 0
    assert h.fake.consumers() == []
    assert not h.state_dir.exists() and not h.output_root.exists()


def test_sighup_reloads_and_a_changed_auto_approve_takes_effect(daemon_harness: HarnessFactory) -> None:
    h = daemon_harness(daemon={"auto_approve": False})
    capstor = h.offerings[0].uuid
    waiting = h.submit(OrderSpec("Create", capstor))
    h.daemon.wait_event("order.awaiting_approval", where=lambda r: r.get("order_uuid") == waiting.uuid)
    assert h.fake.order_state(waiting.uuid) == "pending-provider"
    assert h.order_files(waiting) == []

    h.write_config(auto_approve=True)
    h.daemon.reload()
    h.daemon.wait_event("config.reloaded")
    assert not h.daemon.events("config.reload_needs_restart")
    run = h.daemon.current
    assert wait_until(lambda: "RELOADING=1" in run.notifications, 10)
    approved = h.submit(OrderSpec("Create", capstor))
    h.wait_all_done([approved], timeout=60)
    h.wait_all_done([waiting], timeout=60)  # the order left waiting is approved by the next reconciliation

    h.write_config(auto_approve=False)
    h.daemon.reload()
    h.daemon.wait_event("config.reloaded", count=2)
    held = h.submit(OrderSpec("Create", capstor))
    h.daemon.wait_event("order.awaiting_approval", where=lambda r: r.get("order_uuid") == held.uuid)
    assert h.fake.order_state(held.uuid) == "pending-provider"
    h.final_check([waiting, approved])
    assert h.fake.order_state(held.uuid) == "pending-provider"
    assert h.daemon.current.index == 1  # reloaded in place, never restarted
    assert h.daemon.terminate() == 0


def test_ready_and_watchdog_over_notify_socket(daemon_harness: HarnessFactory) -> None:
    h = daemon_harness(existing=3)
    run = h.daemon.current
    assert wait_until(lambda: "WATCHDOG=1" in run.notifications, 10)
    assert run.notifications.index("READY=1") < run.notifications.index("WATCHDOG=1")
    assert len(h.daemon.events("daemon.ready")) == 1
    # READY comes after the first all.json of every offering, the broker connection of every offering and the
    # first reconciliation pass.
    records = run.log_records()
    ready_at = next(i for i, r in enumerate(records) if r.get("event") == "daemon.ready")
    before = records[:ready_at]
    for offering in h.offerings:
        assert any(r.get("event") == "snapshot.written" and r.get("offering") == offering.slug for r in before)
        assert any(r.get("event") == "reconcile.finished" and r.get("offering") == offering.slug for r in before)
        connected = [
            r for r in before if r.get("event") == "broker.connected" and r.get("transport") == f"stomp:{offering.slug}"
        ]
        assert connected, f"READY before the broker connection of {offering.slug}"
    assert h.daemon.terminate() == 0
