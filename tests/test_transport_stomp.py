"""StompTransport against the real RabbitMQ (STOMP 61613, Web-STOMP 15674 /ws), one test per rule of spec
events §1 "STOMP rules" and "Known pitfalls". Messages are published exactly as Waldur does
(`publish_stomp_like_waldur`). Every test runs in its own vhost (deleted afterwards)."""

from __future__ import annotations

import hashlib
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import stomp

from cscs_storage_daemon.testing.publishers import (
    RabbitManagement,
    mastermind_topic_for_queue,
    publish_stomp_like_waldur,
)
from cscs_storage_daemon.transports import (
    Backoff,
    Delivery,
    StompSubscription,
    StompTransport,
    Transport,
    legacy_queue_name,
    queue_destination,
    validate_destination,
)
from tests.fixtures.brokers import (
    Brokers,
    TlsProxy,
    close_vhost_connections,
    golden_messages,
    queue_counts,
)

FAST = Backoff(initial=0.05, maximum=0.2)
MODES = ["tcp", "websocket"]


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


class Recorder:
    """on_delivery that only enqueues (as the daemon's must), plus the transport's hooks."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.queue: queue.Queue[Delivery] = queue.Queue()
        self.threads: set[int] = set()
        self.connected = 0
        self.disconnected = 0
        self.missing: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, delivery: Delivery) -> None:
        with self._lock:
            self.deliveries.append(delivery)
            self.threads.add(threading.get_ident())
        self.queue.put(delivery)

    def hook(self, transport: Any) -> None:
        transport.on_connected = self._on_connected
        transport.on_disconnected = self._on_disconnected
        transport.on_queue_missing = self.missing.append

    def _on_connected(self) -> None:
        self.connected += 1

    def _on_disconnected(self) -> None:
        self.disconnected += 1

    def bodies(self) -> list[bytes]:
        with self._lock:
            return [d.body for d in self.deliveries]

    def wait_count(self, n: int, timeout: float = 10.0) -> bool:
        return wait_until(lambda: len(self.deliveries) >= n, timeout)


@pytest.fixture
def stomp_env(brokers: Brokers, broker_vhost: str, rabbit_admin: RabbitManagement) -> Iterator[StompEnv]:
    env = StompEnv(brokers, broker_vhost, rabbit_admin)
    yield env
    env.close()


class StompEnv:
    """Queues in the test's vhost, Waldur-style publishing into them, transports stopped at the end."""

    def __init__(self, brokers: Brokers, vhost: str, admin: RabbitManagement) -> None:
        self.brokers = brokers
        self.vhost = vhost
        self.admin = admin
        self.transports: list[StompTransport] = []

    def queue(self, name: str | None = None) -> str:
        name = name or f"consumer_{uuid.uuid4().hex}"
        self.admin.declare_waldur_queue(self.vhost, name)
        return name

    def sub(self, queue_name: str, login: str = "guest", passcode: str = "guest") -> StompSubscription:
        return StompSubscription(queue_destination(queue_name), login=login, passcode=passcode, vhost=self.vhost)

    def publish(self, queue_name: str, body: str | bytes, retries: int = 0) -> None:
        for attempt in range(retries + 1):
            try:
                publish_stomp_like_waldur(
                    self.brokers.host, self.brokers.stomp_port, self.vhost, "guest", "guest", queue_name, body
                )
                return
            except Exception:
                if attempt == retries:
                    raise
                time.sleep(0.1)

    def transport(
        self, subs: list[StompSubscription], mode: str = "tcp", recorder: Recorder | None = None, **kwargs: Any
    ) -> tuple[StompTransport, Recorder]:
        kwargs.setdefault("backoff", FAST)
        kwargs.setdefault("connect_timeout", 5.0)
        if mode == "websocket":
            host_port = (self.brokers.host, self.brokers.web_stomp_port)
            kwargs.setdefault("websocket_path", self.brokers.web_stomp_path)
        else:
            host_port = (self.brokers.host, self.brokers.stomp_port)
        transport = StompTransport(*host_port, subscriptions=subs, **kwargs)
        recorder = recorder or Recorder()
        recorder.hook(transport)
        self.transports.append(transport)
        transport.start(recorder)
        return transport, recorder

    def close(self) -> None:
        for transport in self.transports:
            transport.stop(timeout=2.0)


# --------------------------------------------------------------------------------------------------------------
# rules checked without a broker


def test_queue_prefix_is_refused() -> None:
    """`/queue/<name>` re-declares the queue (PRECONDITION_FAILED against Waldur's arguments): refused."""
    with pytest.raises(ValueError, match="/amq/queue/"):
        StompSubscription("/queue/consumer_0123abcd", login="u", passcode="p", vhost="v")
    for bad in ("/topic/x", "consumer_0123", "/exchange/amq.topic/x", "/amq/queue/", "/amq/queue/a/b"):
        with pytest.raises(ValueError):
            validate_destination(bad)
    transport = StompTransport("127.0.0.1", 61613, subscriptions=[])
    with pytest.raises(ValueError, match="/amq/queue/"):
        transport.update_subscriptions([StompSubscription("/queue/x", "u", "p", "v")])


def test_queue_names_are_dashless() -> None:
    dashed_sub, dashed_off = str(uuid.uuid4()), str(uuid.uuid4()).upper()
    name = legacy_queue_name(dashed_sub, dashed_off, "order")
    assert name == f"subscription_{uuid.UUID(dashed_sub).hex}_offering_{uuid.UUID(dashed_off).hex}_order"
    assert "-" not in name
    with pytest.raises(ValueError, match="dash-less"):
        validate_destination(f"/amq/queue/subscription_{dashed_sub}_offering_{uuid.UUID(dashed_off).hex}_order")
    with pytest.raises(ValueError):
        validate_destination(f"/amq/queue/consumer_{dashed_sub}")


def test_connection_grouping_and_passcode_consistency() -> None:
    subs = [
        StompSubscription(queue_destination("consumer_aa"), "login-a", "token", "v1"),
        StompSubscription(queue_destination("consumer_bb"), "login-a", "other-token", "v1"),
    ]
    with pytest.raises(ValueError, match="passcodes"):
        StompTransport("127.0.0.1", 61613, subscriptions=subs)
    assert "token" not in repr(subs[0])  # secrets stay out of logs


def test_satisfies_transport_protocol() -> None:
    transport = StompTransport("127.0.0.1", 61613, subscriptions=[])
    assert isinstance(transport, Transport)
    assert transport.connected is False and transport.reconnects == 0


# --------------------------------------------------------------------------------------------------------------
# on the broker


@pytest.mark.broker
@pytest.mark.parametrize("mode", MODES)
def test_golden_bodies_delivered_byte_identical(stomp_env: StompEnv, mode: str) -> None:
    """Every golden Waldur body, published like Mastermind, arrives byte-identical with Waldur's headers."""
    golden = golden_messages()
    queues = sorted({m.queue_name for m in golden})
    for name in queues:
        stomp_env.queue(name)
    transport, rec = stomp_env.transport([stomp_env.sub(q) for q in queues], mode=mode)
    assert wait_until(lambda: transport.connected)
    assert len(transport.stomp_connections()) == 1  # one (vhost, login): one connection
    for message in golden:
        stomp_env.publish(message.queue_name, message.body)
    assert rec.wait_count(len(golden))
    time.sleep(0.2)
    assert len(rec.deliveries) == len(golden)

    expected = Counter((f"/amq/queue/{m.queue_name}", m.body.encode()) for m in golden)
    assert Counter((d.destination, d.body) for d in rec.deliveries) == expected
    for delivery in rec.deliveries:
        name = delivery.destination.removeprefix("/amq/queue/")
        headers = delivery.headers
        assert headers["destination"] == f"/queue/{name}"
        assert headers["subscription"] == name
        assert headers["redelivered"] == "false"
        assert headers["ack"]  # STOMP 1.2 + client-individual
        assert headers["persistent"] == "true" and headers["durable"] == "true"
        assert headers["auto-delete"] == "false"
        assert headers["content-type"] == "application/json"
        assert headers["content-length"] == str(len(delivery.body))
        topic = mastermind_topic_for_queue(name)
        expected_id = hashlib.sha256(f"{stomp_env.vhost}:{topic}:".encode() + delivery.body).hexdigest()[:32]
        assert headers["x-message-id"] == expected_id
        assert "receipt" not in headers
        assert delivery.transport == "stomp"
        assert delivery.received_at <= time.time()
        assert delivery.ack() is True
    assert wait_until(lambda: all(v == (0, 0) for v in queue_counts(stomp_env.vhost).values()), 10, 0.3)
    assert transport.reconnects == 0


@pytest.mark.broker
@pytest.mark.parametrize("mode", MODES)
def test_heartbeats_set_on_the_connection_object(stomp_env: StompEnv, mode: str) -> None:
    """Heartbeats live on the stomp.py connection (which runs the heartbeat thread), not only in CONNECT."""
    name = stomp_env.queue()
    transport, _ = stomp_env.transport([stomp_env.sub(name)], mode=mode, heartbeat_ms=10000)
    assert wait_until(lambda: transport.connected)
    (conn,) = transport.stomp_connections()
    assert isinstance(conn, stomp.connect.StompConnection12)
    assert conn.version == "1.2"
    assert conn.heartbeats == (10000, 10000)  # negotiated with RabbitMQ's CONNECTED heart-beat
    assert conn.heartbeat_thread is not None and conn.heartbeat_thread.is_alive()
    assert conn.transport.vhost == stomp_env.vhost


@pytest.mark.broker
def test_unacked_message_is_redelivered_after_the_connection_drops(stomp_env: StompEnv) -> None:
    """client-individual: an unacked delivery goes back to the queue when the connection drops and comes back
    with `redelivered: true`; acking the stale delivery afterwards is a harmless no-op."""
    name = stomp_env.queue()
    transport, rec = stomp_env.transport([stomp_env.sub(name)])
    assert wait_until(lambda: transport.connected)
    stomp_env.publish(name, b'{"order_uuid": "x"}')
    assert rec.wait_count(1)
    first = rec.deliveries[0]
    assert "ack" in first.headers and first.headers["redelivered"] == "false"

    close_vhost_connections(stomp_env.vhost, "test")
    assert rec.wait_count(2)
    second = rec.deliveries[1]
    assert second.body == first.body
    assert second.headers["redelivered"] == "true"
    assert first.ack() is False  # its connection is gone: no-op (debug log), no exception
    assert first.ack() is False  # idempotent
    assert second.ack() is True
    assert second.ack() is False
    assert wait_until(lambda: queue_counts(stomp_env.vhost)[name] == (0, 0), 10, 0.3)
    assert transport.reconnects == 1


@pytest.mark.broker
def test_prefetch_limits_unacked_deliveries(stomp_env: StompEnv) -> None:
    name = stomp_env.queue()
    for i in range(6):
        stomp_env.publish(name, f'{{"n": {i}}}')
    _, rec = stomp_env.transport([stomp_env.sub(name)], prefetch=3)
    assert rec.wait_count(3)
    time.sleep(0.5)
    assert len(rec.deliveries) == 3  # no more while three are unacknowledged
    assert rec.deliveries[0].ack()
    assert rec.wait_count(4)
    time.sleep(0.3)
    assert len(rec.deliveries) == 4
    for delivery in rec.deliveries[1:]:
        delivery.ack()
    assert rec.wait_count(6)
    for delivery in rec.deliveries[4:]:
        delivery.ack()
    assert [d.body for d in rec.deliveries] == [f'{{"n": {i}}}'.encode() for i in range(6)]
    assert wait_until(lambda: queue_counts(stomp_env.vhost)[name] == (0, 0), 10, 0.3)


@pytest.mark.broker
def test_dashless_legacy_queue_receives_waldur_messages(stomp_env: StompEnv) -> None:
    """Configured uuids with dashes still name the queue Mastermind fills (uuid.hex)."""
    sub_uuid, offering_uuid = uuid.uuid4(), uuid.uuid4()
    mastermind_name = f"subscription_{sub_uuid.hex}_offering_{offering_uuid.hex}_order"
    stomp_env.queue(mastermind_name)
    ours = legacy_queue_name(str(sub_uuid), str(offering_uuid), "order")
    assert ours == mastermind_name
    transport, rec = stomp_env.transport([stomp_env.sub(ours)])
    assert wait_until(lambda: transport.connected)
    stomp_env.publish(mastermind_name, '{"order_uuid": "a"}')
    assert rec.wait_count(1)
    assert rec.deliveries[0].destination == f"/amq/queue/{mastermind_name}"
    rec.deliveries[0].ack()


@pytest.mark.broker
@pytest.mark.parametrize("mode", MODES)
def test_broker_closing_connections_reconnects_resubscribes_loses_nothing(stomp_env: StompEnv, mode: str) -> None:
    """`rabbitmqctl close_all_connections` during a stream: the transport reconnects (counter, on_connected
    again), re-subscribes, and every message is eventually seen and acked (at least once)."""
    name = stomp_env.queue()
    transport, rec = stomp_env.transport([stomp_env.sub(name)], mode=mode)
    assert wait_until(lambda: transport.connected)
    assert rec.connected == 1

    stop_worker = threading.Event()

    def worker() -> None:  # the daemon's worker: handles off the receiver thread, acks later
        while not stop_worker.is_set():
            try:
                delivery = rec.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            time.sleep(0.005)
            delivery.ack()

    threading.Thread(target=worker, daemon=True).start()
    bodies = [f'{{"n": {i}, "id": "{uuid.uuid4().hex}"}}'.encode() for i in range(40)]
    for i, body in enumerate(bodies):
        if i in (15, 28):
            close_vhost_connections(stomp_env.vhost, "test")
        stomp_env.publish(name, body, retries=5)
    try:
        assert wait_until(lambda: set(bodies) <= set(rec.bodies()), 20)
        assert wait_until(lambda: transport.connected, 10)
        assert wait_until(lambda: queue_counts(stomp_env.vhost)[name] == (0, 0), 10, 0.3)
    finally:
        stop_worker.set()
    assert transport.reconnects >= 2
    assert rec.connected == 1 + transport.reconnects  # on_connected after every reconnect
    assert rec.disconnected >= 2
    assert len(transport.connect_thread_ids) == 1  # one reconnect loop, always the supervisor thread
    assert transport.max_parallel_connects == 1
    assert threading.get_ident() not in rec.threads


@pytest.mark.broker
def test_one_connection_per_login_and_one_reconnect_loop_at_a_time(
    stomp_env: StompEnv, rabbit_admin: RabbitManagement
) -> None:
    """Legacy mode: one login per object type -> one connection each. Repeated broker-side drops never run two
    connect attempts at once, nor on any thread but the supervisor."""
    logins = [f"cscs-test-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    for login in logins:
        rabbit_admin.put_user(login, "secret-" + login)
        rabbit_admin.put_permissions(stomp_env.vhost, login)
    try:
        queues = [stomp_env.queue() for _ in logins]
        subs = [stomp_env.sub(q, login=lg, passcode="secret-" + lg) for q, lg in zip(queues, logins, strict=True)]
        transport, rec = stomp_env.transport(subs)
        assert wait_until(lambda: transport.connected)
        assert len(transport.stomp_connections()) == 2
        users = (
            {c["user"] for c in rabbit_admin.connections(stomp_env.vhost)}
            if wait_until(lambda: len(rabbit_admin.connections(stomp_env.vhost)) == 2, 10, 0.2)
            else set()
        )
        assert users == set(logins)
        for _ in range(3):
            close_vhost_connections(stomp_env.vhost, "test")
            time.sleep(0.05)
        assert wait_until(lambda: transport.connected and transport.reconnects >= 2, 15)
        for q in queues:
            stomp_env.publish(q, f'{{"queue": "{q}"}}')
        assert rec.wait_count(2)
        assert {d.destination for d in rec.deliveries} == {f"/amq/queue/{q}" for q in queues}
        for delivery in rec.deliveries:
            assert delivery.ack()
        assert transport.max_parallel_connects == 1
        assert len(transport.connect_thread_ids) == 1
        assert threading.get_ident() not in transport.connect_thread_ids
    finally:
        stomp_env.close()
        for login in logins:
            rabbit_admin.delete_user(login)


@pytest.mark.broker
def test_deleted_queue_calls_on_queue_missing(stomp_env: StompEnv, rabbit_admin: RabbitManagement) -> None:
    """RabbitMQ cancels the subscription of a deleted queue; the re-subscribe gets NOT_FOUND -> hook. Once the
    queue exists again (re-registration), the transport recovers by itself."""
    name = stomp_env.queue()
    transport, rec = stomp_env.transport([stomp_env.sub(name)])
    assert wait_until(lambda: transport.connected)
    rabbit_admin.delete_queue(stomp_env.vhost, name)
    assert wait_until(lambda: f"/amq/queue/{name}" in rec.missing)
    assert not transport.connected
    stomp_env.queue(name)  # what Waldur's create_queue / register_queue does
    assert wait_until(lambda: transport.connected)
    stomp_env.publish(name, "{}")
    assert rec.wait_count(1)
    assert rec.deliveries[0].ack()


@pytest.mark.broker
def test_missing_queue_at_start_calls_on_queue_missing_and_update_subscriptions_recovers(
    stomp_env: StompEnv,
) -> None:
    missing = f"consumer_{uuid.uuid4().hex}"
    transport, rec = stomp_env.transport([stomp_env.sub(missing)])
    assert wait_until(lambda: len(rec.missing) >= 2)  # keeps retrying (with backoff), reporting each time
    assert set(rec.missing) == {f"/amq/queue/{missing}"}
    assert not transport.connected
    fresh = stomp_env.queue()
    transport.update_subscriptions([stomp_env.sub(fresh)])  # the daemon after re-registration
    assert wait_until(lambda: transport.connected)
    stomp_env.publish(fresh, '{"ok": true}')
    assert rec.wait_count(1)
    assert rec.deliveries[0].destination == f"/amq/queue/{fresh}"
    assert rec.deliveries[0].ack()


@pytest.mark.broker
@pytest.mark.parametrize("mode", MODES)
def test_on_delivery_raising_never_kills_delivery(stomp_env: StompEnv, mode: str) -> None:
    name = stomp_env.queue()
    seen: list[bytes] = []

    def on_delivery(delivery: Delivery) -> None:
        if delivery.body == b"boom":
            raise RuntimeError("handler bug")
        seen.append(delivery.body)
        delivery.ack()

    transport = StompTransport(
        stomp_env.brokers.host,
        stomp_env.brokers.web_stomp_port if mode == "websocket" else stomp_env.brokers.stomp_port,
        subscriptions=[stomp_env.sub(name)],
        websocket_path=stomp_env.brokers.web_stomp_path if mode == "websocket" else None,
        backoff=FAST,
    )
    stomp_env.transports.append(transport)
    transport.start(on_delivery)
    assert wait_until(lambda: transport.connected)
    for body in (b"boom", b"a", b"boom", b"b"):
        stomp_env.publish(name, body)
    assert wait_until(lambda: seen == [b"a", b"b"])
    assert transport.callback_errors == 2
    assert transport.connected and transport.reconnects == 0 and transport.alive
    # the failed ones stay unacknowledged (the broker redelivers them on the next connection)
    assert wait_until(lambda: queue_counts(stomp_env.vhost)[name] == (0, 2), 10, 0.3)


@pytest.mark.broker
def test_handlers_run_off_the_receiver_thread_which_keeps_reading(stomp_env: StompEnv) -> None:
    """on_delivery only enqueues; a slow worker acks later from its own thread while the receiver thread keeps
    receiving messages and heartbeats (1 s heartbeats, the worker sleeps 2.5 s)."""
    name = stomp_env.queue()
    transport, rec = stomp_env.transport([stomp_env.sub(name)], heartbeat_ms=1000)
    assert wait_until(lambda: transport.connected)
    (conn,) = transport.stomp_connections()
    assert conn.heartbeats == (1000, 1000)

    acked_at: dict[bytes, float] = {}
    heartbeat_seen: list[float] = []
    worker_thread: list[int] = []

    def worker() -> None:
        worker_thread.append(threading.get_ident())
        first = rec.queue.get(timeout=10)
        before = conn.received_heartbeat
        time.sleep(2.5)  # a slow handler
        heartbeat_seen.append(conn.received_heartbeat - before)
        assert first.ack()
        acked_at[first.body] = time.time()
        for _ in range(2):
            delivery = rec.queue.get(timeout=10)
            assert delivery.ack()
            acked_at[delivery.body] = time.time()

    thread = threading.Thread(target=worker)
    thread.start()
    for body in (b'{"n": 1}', b'{"n": 2}', b'{"n": 3}'):
        stomp_env.publish(name, body)
    thread.join(20)
    assert len(acked_at) == 3
    assert rec.threads and worker_thread[0] not in rec.threads  # on_delivery ran on the receiver thread
    # while the first message was still being handled, the others had already been received
    assert max(d.received_at for d in rec.deliveries) < acked_at[b'{"n": 1}']
    assert heartbeat_seen[0] >= 1.0  # heartbeats kept arriving during the slow handler
    assert transport.connected and transport.reconnects == 0
    assert wait_until(lambda: queue_counts(stomp_env.vhost)[name] == (0, 0), 10, 0.3)


@pytest.mark.broker
def test_web_stomp_non_utf8_body_is_delivered_not_redelivered_forever(stomp_env: StompEnv) -> None:
    """RabbitMQ Web-STOMP sends text frames; the transport's WebSocket skips UTF-8 validation, so the body
    reaches the daemon (which dead-letters it) and can be acked."""
    name = stomp_env.queue()
    bad = b'{"order_uuid": "\xff\xfe not utf-8"}'
    stomp_env.publish(name, bad)
    transport, rec = stomp_env.transport([stomp_env.sub(name)], mode="websocket")
    assert rec.wait_count(1)
    assert rec.deliveries[0].body == bad
    assert rec.deliveries[0].ack()
    stomp_env.publish(name, b'{"after": 1}')
    assert rec.wait_count(2)
    assert rec.deliveries[1].ack()
    assert transport.reconnects == 0 and transport.connected
    assert wait_until(lambda: queue_counts(stomp_env.vhost)[name] == (0, 0), 10, 0.3)


@pytest.mark.broker
def test_web_stomp_pitfall_default_websocket_drops_the_connection(stomp_env: StompEnv) -> None:
    """The pitfall the transport avoids, shown on this stack: stomp.py's stock WSStompConnection loses the
    connection on a non-UTF-8 body (so the message would be redelivered forever)."""
    name = stomp_env.queue()
    stomp_env.publish(name, b"\xff\xfe")
    got: list[Any] = []
    dropped = threading.Event()

    class Listener(stomp.ConnectionListener):  # type: ignore[misc]
        def on_message(self, frame: Any) -> None:
            got.append(frame)

        def on_disconnected(self) -> None:
            dropped.set()

    conn = stomp.WSStompConnection(
        [(stomp_env.brokers.host, stomp_env.brokers.web_stomp_port)],
        ws_path=stomp_env.brokers.web_stomp_path,
        vhost=stomp_env.vhost,
        auto_decode=False,
        reconnect_attempts_max=1,
    )
    conn.set_listener("l", Listener())
    conn.connect("guest", "guest", wait=True)
    conn.subscribe(f"/amq/queue/{name}", id="s", ack="client-individual")
    try:
        assert dropped.wait(10)
        assert got == []
    finally:
        conn.transport.disconnect_socket()


@pytest.mark.broker
def test_nack_requeues_or_drops(stomp_env: StompEnv) -> None:
    name = stomp_env.queue()
    transport, rec = stomp_env.transport([stomp_env.sub(name)])
    assert wait_until(lambda: transport.connected)
    stomp_env.publish(name, b"x")
    assert rec.wait_count(1)
    assert rec.deliveries[0].nack() is True
    assert rec.wait_count(2)
    assert rec.deliveries[1].redelivered
    assert rec.deliveries[1].nack(requeue=False) is True  # dead-lettered by the queue's DLX settings
    time.sleep(0.3)
    assert len(rec.deliveries) == 2
    assert wait_until(lambda: queue_counts(stomp_env.vhost)[name] == (0, 0), 10, 0.3)


@pytest.mark.broker
@pytest.mark.parametrize("mode", MODES)
def test_tls_honours_verification(
    stomp_env: StompEnv, tls_proxy: Callable[[int], TlsProxy], tls_files: Any, mode: str
) -> None:
    """TLS (TCP or wss://): trusted CA -> connects; verify_tls=False -> connects; verification against the
    system store with a self-signed server certificate -> never connects (and keeps retrying)."""
    upstream = stomp_env.brokers.web_stomp_port if mode == "websocket" else stomp_env.brokers.stomp_port
    proxy = tls_proxy(upstream)
    name = stomp_env.queue()

    def make(**kwargs: Any) -> StompTransport:
        transport = StompTransport(
            "127.0.0.1",
            proxy.port,
            subscriptions=[stomp_env.sub(name)],
            websocket_path=stomp_env.brokers.web_stomp_path if mode == "websocket" else None,
            tls=True,
            backoff=FAST,
            connect_timeout=3.0,
            **kwargs,
        )
        stomp_env.transports.append(transport)
        return transport

    rec = Recorder()
    trusted = make(verify_tls=True, ca_file=tls_files.cert)
    trusted.start(rec)
    assert wait_until(lambda: trusted.connected)
    stomp_env.publish(name, b'{"tls": 1}')
    assert rec.wait_count(1)
    assert rec.deliveries[0].ack()  # an ack from this (worker) thread goes through the TLS connection
    trusted.stop()

    insecure = make(verify_tls=False)
    insecure.start(rec)
    assert wait_until(lambda: insecure.connected)
    stomp_env.publish(name, b'{"tls": 2}')
    assert rec.wait_count(2)
    assert rec.deliveries[1].ack()
    insecure.stop()

    failures_before = proxy.handshakes_failed
    strict = make(verify_tls=True)
    strict.start(rec)
    assert wait_until(lambda: strict.connect_attempts >= 3 and proxy.handshakes_failed >= failures_before + 2)
    assert not strict.connected
    assert wait_until(lambda: queue_counts(stomp_env.vhost)[name] == (0, 0), 10, 0.3)


@pytest.mark.broker
def test_stop_returns_unacked_messages_and_later_acks_are_noops(stomp_env: StompEnv) -> None:
    name = stomp_env.queue()
    transport, rec = stomp_env.transport([stomp_env.sub(name)])
    assert wait_until(lambda: transport.connected)
    stomp_env.publish(name, b"keep")
    assert rec.wait_count(1)
    transport.stop(timeout=5)
    assert not transport.connected and rec.disconnected == 1 and not transport.alive
    assert rec.deliveries[0].ack() is False
    assert wait_until(lambda: queue_counts(stomp_env.vhost)[name] == (1, 0), 10, 0.3)
    transport.stop()  # idempotent


@pytest.mark.broker
def test_ack_is_thread_safe_and_idempotent_across_threads(stomp_env: StompEnv) -> None:
    """Many workers ack at once, each delivery twice from two threads: exactly one ACK per delivery is sent,
    none fails, the queue ends empty and the connection stays up."""
    name = stomp_env.queue()
    transport, rec = stomp_env.transport([stomp_env.sub(name)], prefetch=50)
    assert wait_until(lambda: transport.connected)
    for i in range(40):
        stomp_env.publish(name, f'{{"n": {i}}}')
    assert rec.wait_count(40)
    results: list[bool] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker(part: list[Delivery]) -> None:
        barrier.wait()
        for delivery in part:
            sent = delivery.ack()
            with lock:
                results.append(sent)

    deliveries = list(rec.deliveries)
    parts = [deliveries[i % 4 :: 4] for i in range(8)]  # every delivery appears in two parts
    threads = [threading.Thread(target=worker, args=(part,)) for part in parts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results.count(True) == 40 and results.count(False) == 40
    assert all(d.outcome == "ack" for d in deliveries)
    assert wait_until(lambda: queue_counts(stomp_env.vhost)[name] == (0, 0), 10, 0.3)
    assert transport.connected and transport.reconnects == 0
