"""MqttTransport against the real Mosquitto (TCP 1883; WebSocket via `mqtt_websocket`), one test per rule of
spec events §1 "MQTT rules" and the paho pitfall. Messages are published as old Mastermind did
(`publish_mqtt_like_waldur`: MQTT 3.1.1, QoS 0) or with QoS 1 where the broker must queue them."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cscs_storage_daemon.testing.publishers import publish_mqtt_like_waldur
from cscs_storage_daemon.transports import Backoff, Delivery, MqttTransport, Transport, mqtt_topic
from tests.fixtures.brokers import Brokers, MqttWebSocket, TlsFiles, TlsProxy, golden_messages

FAST = Backoff(initial=0.05, maximum=0.2)
WS_PATH = "/mqtt"


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


class Recorder:
    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.queue: queue.Queue[Delivery] = queue.Queue()
        self.threads: set[int] = set()
        self.connected = 0
        self.disconnected = 0
        self._lock = threading.Lock()

    def __call__(self, delivery: Delivery) -> None:
        with self._lock:
            self.deliveries.append(delivery)
            self.threads.add(threading.get_ident())
        self.queue.put(delivery)

    def hook(self, transport: MqttTransport) -> None:
        transport.on_connected = self._on_connected
        transport.on_disconnected = self._on_disconnected

    def _on_connected(self) -> None:
        self.connected += 1

    def _on_disconnected(self) -> None:
        self.disconnected += 1

    def wait_count(self, n: int, timeout: float = 10.0) -> bool:
        return wait_until(lambda: len(self.deliveries) >= n, timeout)


def purge_session(host: str, port: int, client_id: str) -> None:
    """Remove a persistent session from the broker (MQTT 5 clean start + session expiry 0)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    done = threading.Event()
    client.on_connect = lambda *args: done.set()
    try:
        client.connect(host, port, clean_start=True, properties=props)
        client.loop_start()
        done.wait(5)
        client.disconnect()
        client.loop_stop()
    except OSError:
        pass


class MqttEnv:
    def __init__(self, brokers: Brokers) -> None:
        self.brokers = brokers
        self.transports: list[MqttTransport] = []
        self.client_ids: set[str] = set()

    @staticmethod
    def topic(object_type: str = "order") -> str:
        return mqtt_topic(str(uuid.uuid4()), str(uuid.uuid4()), object_type)

    def client_id(self) -> str:
        client_id = f"cscs-test-{uuid.uuid4().hex[:12]}"
        self.client_ids.add(client_id)
        return client_id

    def publish(self, topic: str, body: str | bytes, qos: int = 0, **kwargs: Any) -> None:
        kwargs.setdefault("host", self.brokers.host)
        kwargs.setdefault("port", self.brokers.mqtt_port)
        publish_mqtt_like_waldur(kwargs.pop("host"), kwargs.pop("port"), topic, body, qos=qos, **kwargs)

    def transport(
        self,
        topics: list[str],
        client_id: str,
        recorder: Recorder | None = None,
        start: bool = True,
        **kwargs: Any,
    ) -> tuple[MqttTransport, Recorder]:
        kwargs.setdefault("backoff", FAST)
        kwargs.setdefault("connect_timeout", 5.0)
        kwargs.setdefault("session_expiry", 300)
        host = kwargs.pop("host", self.brokers.host)
        port = kwargs.pop("port", self.brokers.mqtt_port)
        transport = MqttTransport(host, port, topics=topics, client_id=client_id, **kwargs)
        recorder = recorder or Recorder()
        recorder.hook(transport)
        self.transports.append(transport)
        if start:
            transport.start(recorder)
        return transport, recorder

    def close(self) -> None:
        for transport in self.transports:
            transport.stop(timeout=2.0)
        for client_id in self.client_ids:
            purge_session(self.brokers.host, self.brokers.mqtt_port, client_id)


@pytest.fixture
def mqtt_env(brokers: Brokers) -> Iterator[MqttEnv]:
    env = MqttEnv(brokers)
    yield env
    env.close()


# --------------------------------------------------------------------------------------------------------------
# without a broker


def test_topic_is_waldur_topic_without_dashes() -> None:
    sub, offering = uuid.uuid4(), uuid.uuid4()
    assert (
        mqtt_topic(str(sub), str(offering).upper(), "order") == f"subscription/{sub.hex}/offering/{offering.hex}/order"
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"topics": [], "client_id": "x"},
        {"topics": ["subscription/#"], "client_id": "x"},
        {"topics": ["a/+/b"], "client_id": "x"},
        {"topics": ["a"], "client_id": ""},
        {"topics": ["a"], "client_id": "x", "protocol_version": 3},
    ],
)
def test_rejects_bad_configuration(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        MqttTransport("127.0.0.1", 1883, **kwargs)


def test_satisfies_transport_protocol_and_uses_paho_v2_manual_ack() -> None:
    transport = MqttTransport("127.0.0.1", 1, topics=["a"], client_id="x", websocket_path="/ws")
    assert isinstance(transport, Transport)
    client = transport._make_client()
    assert client.callback_api_version == CallbackAPIVersion.VERSION2
    assert client._manual_ack is True
    assert client._protocol == mqtt.MQTTv5
    assert client._transport == "websockets"
    assert client._reconnect_on_failure is False  # our supervisor reconnects, with our backoff


# --------------------------------------------------------------------------------------------------------------
# on the broker


@pytest.mark.broker
@pytest.mark.parametrize("mode", ["tcp", "websocket"])
def test_golden_bodies_delivered_byte_identical(mqtt_env: MqttEnv, mqtt_websocket: MqttWebSocket, mode: str) -> None:
    golden = golden_messages()
    # The real Waldur topics, but under a per-test first level so parallel runs do not see each other.
    prefix = uuid.uuid4().hex[:8]
    topic_of = {m.topic: f"{prefix}/{m.topic}" for m in golden}
    topics = sorted(set(topic_of.values()))
    kwargs: dict[str, Any] = {}
    if mode == "websocket":
        kwargs = {"host": mqtt_websocket.host, "port": mqtt_websocket.port, "websocket_path": WS_PATH}
    transport, rec = mqtt_env.transport(topics, mqtt_env.client_id(), **kwargs)
    assert wait_until(lambda: transport.connected)
    for message in golden:
        mqtt_env.publish(topic_of[message.topic], message.body, **kwargs)  # QoS 0, like Mastermind
    assert rec.wait_count(len(golden))
    time.sleep(0.2)
    assert Counter((d.destination, d.body) for d in rec.deliveries) == Counter(
        (topic_of[m.topic], m.body.encode()) for m in golden
    )
    for delivery in rec.deliveries:
        assert delivery.transport == "mqtt"
        assert delivery.headers["topic"] == delivery.destination
        assert delivery.headers["qos"] == "0"  # delivered QoS = min(publish 0, subscribe 1)
        assert delivery.ack() is True  # nothing to acknowledge at QoS 0
    if mode == "websocket" and mqtt_websocket.kind == "bridge":
        assert WS_PATH in mqtt_websocket.paths  # the configured WebSocket path was requested


@pytest.mark.broker
@pytest.mark.parametrize("protocol_version", [5, 4])
def test_persistent_session_keeps_messages_published_while_stopped(mqtt_env: MqttEnv, protocol_version: int) -> None:
    """Stable client id + QoS 1 + persistent session (MQTT 5 clean_start=False + session expiry; MQTT 3.1.1
    clean_session=False): QoS 1 messages published while the daemon is stopped arrive after restart."""
    topic, client_id = mqtt_env.topic(), mqtt_env.client_id()
    first, _ = mqtt_env.transport([topic], client_id, protocol_version=protocol_version)
    assert wait_until(lambda: first.connected)
    first.stop()
    bodies = [f'{{"order_uuid": "{uuid.uuid4().hex}"}}'.encode() for _ in range(5)]
    for body in bodies:
        mqtt_env.publish(topic, body, qos=1)

    second, rec = mqtt_env.transport([topic], client_id, protocol_version=protocol_version)
    assert rec.wait_count(5)
    assert second.session_present is True
    assert [d.body for d in rec.deliveries] == bodies
    assert all(d.headers["qos"] == "1" for d in rec.deliveries)
    assert all(d.ack() for d in rec.deliveries)
    second.stop()

    third, rec3 = mqtt_env.transport([topic], client_id, protocol_version=protocol_version)
    assert wait_until(lambda: third.connected)
    time.sleep(0.5)
    assert rec3.deliveries == []  # acked ones are gone


@pytest.mark.broker
def test_unacked_message_is_resent_on_the_next_session(mqtt_env: MqttEnv) -> None:
    """manual_ack: no PUBACK until Delivery.ack(). Observed on Mosquitto 2.0.11: a QoS 1 message left unacked
    is resent (DUP set) when the same client id resumes its session; the stale delivery's ack is a no-op."""
    topic, client_id = mqtt_env.topic(), mqtt_env.client_id()
    first, rec1 = mqtt_env.transport([topic], client_id)
    assert wait_until(lambda: first.connected)
    mqtt_env.publish(topic, b'{"n": 1}', qos=1)
    assert rec1.wait_count(1)
    stale = rec1.deliveries[0]
    assert stale.headers["qos"] == "1" and not stale.redelivered
    first.stop()
    assert stale.ack() is False  # its session is gone

    second, rec2 = mqtt_env.transport([topic], client_id)
    assert rec2.wait_count(1)
    again = rec2.deliveries[0]
    assert again.body == b'{"n": 1}'
    assert again.redelivered  # DUP flag
    assert again.ack() is True
    assert again.nack() is False  # already settled
    second.stop()

    third, rec3 = mqtt_env.transport([topic], client_id)
    assert wait_until(lambda: third.connected)
    time.sleep(0.5)
    assert rec3.deliveries == []


@pytest.mark.broker
def test_nack_leaves_the_message_for_the_next_session(mqtt_env: MqttEnv) -> None:
    topic, client_id = mqtt_env.topic(), mqtt_env.client_id()
    first, rec1 = mqtt_env.transport([topic], client_id)
    assert wait_until(lambda: first.connected)
    mqtt_env.publish(topic, b"n", qos=1)
    assert rec1.wait_count(1)
    assert rec1.deliveries[0].nack() is False  # MQTT has no NACK
    first.stop()
    _, rec2 = mqtt_env.transport([topic], client_id)
    assert rec2.wait_count(1)
    assert rec2.deliveries[0].ack()


@pytest.mark.broker
@pytest.mark.parametrize("mode", ["tcp", "websocket"])
def test_on_delivery_raising_does_not_stop_delivery(
    mqtt_env: MqttEnv, mqtt_websocket: MqttWebSocket, mode: str
) -> None:
    """The paho pitfall: an exception escaping on_message kills paho's loop thread while is_connected() still
    says True. The transport catches it; later messages keep coming."""
    topic = mqtt_env.topic()
    seen: list[bytes] = []

    def on_delivery(delivery: Delivery) -> None:
        if delivery.body == b"boom":
            raise RuntimeError("handler bug")
        seen.append(delivery.body)
        delivery.ack()

    kwargs: dict[str, Any] = {}
    if mode == "websocket":
        kwargs = {"host": mqtt_websocket.host, "port": mqtt_websocket.port, "websocket_path": WS_PATH}
    transport, _ = mqtt_env.transport([topic], mqtt_env.client_id(), start=False, **kwargs)
    transport.start(on_delivery)
    assert wait_until(lambda: transport.connected)
    for body in (b"boom", b"a", b"boom", b"b"):
        mqtt_env.publish(topic, body, qos=1, **kwargs)
    assert wait_until(lambda: seen == [b"a", b"b"])
    assert transport.callback_errors == 2
    assert transport.connected and transport.reconnects == 0
    assert transport.client._thread is not None and transport.client._thread.is_alive()
    assert transport.alive
    transport.stop()
    assert not transport.alive


@pytest.mark.broker
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_paho_pitfall_raising_on_message_silently_stalls_a_bare_client(mqtt_env: MqttEnv) -> None:
    """What the transport guards against, shown on this stack: with a bare paho client, an exception in
    on_message ends the loop thread; is_connected() still says True and later messages are never handled."""
    topic = mqtt_env.topic()
    handled: list[bytes] = []
    subscribed = threading.Event()

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        if message.payload == b"boom":
            raise RuntimeError("handler bug")
        handled.append(message.payload)

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=mqtt_env.client_id(), protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect(mqtt_env.brokers.host, mqtt_env.brokers.mqtt_port)
    client.loop_start()
    try:
        assert subscribed.wait(5)
        loop_thread = client._thread
        mqtt_env.publish(topic, b"boom", qos=1)
        mqtt_env.publish(topic, b"after", qos=1)
        assert wait_until(lambda: not loop_thread.is_alive(), 5)
        time.sleep(0.3)
        assert handled == []
        assert client.is_connected() is True  # the silent stall
    finally:
        client.loop_stop()
        with contextlib.suppress(Exception):
            client.disconnect()


@pytest.mark.broker
@pytest.mark.parametrize("mode", ["tcp", "websocket"])
def test_reconnects_with_backoff_and_resubscribes(mqtt_env: MqttEnv, mqtt_websocket: MqttWebSocket, mode: str) -> None:
    """The broker drops the connection (session taken over by another client with the same id, or the
    WebSocket dropped): the transport reconnects forever (counter, on_connected again), resubscribes, and
    messages published after the reconnect arrive."""
    topic, client_id = mqtt_env.topic(), mqtt_env.client_id()
    kwargs: dict[str, Any] = {}
    if mode == "websocket":
        kwargs = {"host": mqtt_websocket.host, "port": mqtt_websocket.port, "websocket_path": WS_PATH}
    transport, rec = mqtt_env.transport([topic], client_id, **kwargs)
    assert wait_until(lambda: transport.connected)

    for round_ in range(2):
        before = transport.reconnects
        if mode == "websocket" and mqtt_websocket.kind == "bridge":
            mqtt_websocket.drop_all()
        else:  # a second client with the same id takes the session over; Mosquitto disconnects ours
            thief = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 300
            thief.connect(mqtt_env.brokers.host, mqtt_env.brokers.mqtt_port, clean_start=False, properties=props)
            thief.loop_start()
            time.sleep(0.2)
            thief.disconnect()
            thief.loop_stop()
        assert wait_until(lambda: transport.reconnects > before and transport.connected)
        mqtt_env.publish(topic, f'{{"round": {round_}}}', qos=1)
        assert rec.wait_count(round_ + 1)
        assert rec.deliveries[-1].ack()

    assert rec.connected == 3 and rec.disconnected == 2
    assert len(transport.connect_thread_ids) == 1  # one supervisor thread does every (re)connect
    assert threading.get_ident() not in transport.connect_thread_ids


@pytest.mark.broker
def test_keeps_retrying_while_the_broker_is_unreachable(mqtt_env: MqttEnv) -> None:
    with refusing_port() as port:
        transport, _ = mqtt_env.transport(["a/b"], mqtt_env.client_id(), port=port)
        assert wait_until(lambda: transport.connect_attempts >= 5)
        assert not transport.connected


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port that refuses connections (bound, not listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.mark.broker
def test_handlers_run_off_the_loop_thread_which_keeps_the_session_alive(mqtt_env: MqttEnv) -> None:
    """on_delivery only enqueues; a slow worker (2.5 s, keepalive 1 s) acks later from its own thread while
    paho's loop thread keeps receiving and pinging: no disconnect."""
    topic = mqtt_env.topic()
    transport, rec = mqtt_env.transport([topic], mqtt_env.client_id(), keepalive=1)
    assert wait_until(lambda: transport.connected)
    acked_at: dict[bytes, float] = {}
    worker_ident: list[int] = []

    def worker() -> None:
        worker_ident.append(threading.get_ident())
        first = rec.queue.get(timeout=10)
        time.sleep(2.5)
        assert first.ack()
        acked_at[first.body] = time.time()
        for _ in range(2):
            delivery = rec.queue.get(timeout=10)
            assert delivery.ack()
            acked_at[delivery.body] = time.time()

    thread = threading.Thread(target=worker)
    thread.start()
    for n in (1, 2, 3):
        mqtt_env.publish(topic, f'{{"n": {n}}}', qos=1)
    thread.join(20)
    assert len(acked_at) == 3
    assert worker_ident[0] not in rec.threads
    assert max(d.received_at for d in rec.deliveries) < acked_at[b'{"n": 1}']
    assert transport.connected and transport.reconnects == 0


@pytest.mark.broker
def test_tls_honours_verification(mqtt_env: MqttEnv, tls_proxy: Callable[[int], TlsProxy], tls_files: TlsFiles) -> None:
    proxy = tls_proxy(mqtt_env.brokers.mqtt_port)
    topic = mqtt_env.topic()
    common: dict[str, Any] = {"host": "127.0.0.1", "port": proxy.port, "tls": True}
    trusted, rec = mqtt_env.transport([topic], mqtt_env.client_id(), ca_file=tls_files.cert, **common)
    assert wait_until(lambda: trusted.connected)
    mqtt_env.publish(topic, b"t1", qos=1, tls=True, ca_file=tls_files.cert, host="127.0.0.1", port=proxy.port)
    assert rec.wait_count(1)
    assert rec.deliveries[0].ack()
    trusted.stop()

    insecure, _ = mqtt_env.transport([topic], mqtt_env.client_id(), verify_tls=False, **common)
    assert wait_until(lambda: insecure.connected)
    insecure.stop()

    failed_before = proxy.handshakes_failed
    strict, _ = mqtt_env.transport([topic], mqtt_env.client_id(), **common)
    assert wait_until(lambda: strict.connect_attempts >= 3 and proxy.handshakes_failed >= failed_before + 2)
    assert not strict.connected


@pytest.mark.broker
def test_ack_is_thread_safe_and_idempotent_across_threads(mqtt_env: MqttEnv) -> None:
    topic, client_id = mqtt_env.topic(), mqtt_env.client_id()
    transport, rec = mqtt_env.transport([topic], client_id)
    assert wait_until(lambda: transport.connected)
    for i in range(15):  # within Mosquitto's default in-flight window (20) without acks
        mqtt_env.publish(topic, f'{{"n": {i}}}', qos=1)
    assert rec.wait_count(15)
    results: list[bool] = []
    lock = threading.Lock()
    barrier = threading.Barrier(6)

    def worker(part: list[Delivery]) -> None:
        barrier.wait()
        for delivery in part:
            sent = delivery.ack()
            with lock:
                results.append(sent)

    deliveries = list(rec.deliveries)
    threads = [threading.Thread(target=worker, args=(deliveries[i % 3 :: 3],)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results.count(True) == 15 and results.count(False) == 15
    transport.stop()
    again, rec2 = mqtt_env.transport([topic], client_id)  # nothing left unacknowledged in the session
    assert wait_until(lambda: again.connected)
    time.sleep(0.5)
    assert rec2.deliveries == []
