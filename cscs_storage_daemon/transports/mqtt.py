"""MQTT transport (paho-mqtt 2.x) for legacy Waldur deployments: TCP or WebSocket, optional TLS.

Rules (spec events §1): topic ``subscription/{sub}/offering/{offering}/{type}``; QoS 1 subscription; a stable
client id and a persistent session (MQTT 5: ``clean_start=False`` + a session expiry; MQTT 3.1.1:
``clean_session=False``); manual acknowledgement (``manual_ack=True``, PUBACK only when the daemon calls
:meth:`Delivery.ack`); reconnect forever with the transport backoff, re-subscribing each time.

paho's network loop runs on paho's own thread (``loop_start``), so every packet, PUBACKs sent from worker
threads included, is written by that one thread. paho's own reconnect loop is off (``reconnect_on_failure=False``):
a supervisor thread reconnects with :class:`Backoff`. ``on_message`` never raises - an exception escaping it
would kill paho's loop thread while ``is_connected()`` still says True.

A QoS 0 publisher (old Mastermind) gives at-most-once delivery whatever the subscription; the reconciliation
pass covers that gap.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from functools import partial
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from .backoff import Backoff
from .base import Action, Delivery, DeliveryCallback, TransportHooks, make_ssl_context

__all__ = ["MqttTransport", "mqtt_topic"]

_log = structlog.get_logger("cscs_storage_daemon.transports.mqtt")


def mqtt_topic(subscription_uuid: str, offering_uuid: str, object_type: str) -> str:
    """``subscription/<sub hex>/offering/<offering hex>/<type>`` (dashes stripped, as Mastermind publishes)."""
    sub = uuid.UUID(str(subscription_uuid)).hex
    offering = uuid.UUID(str(offering_uuid)).hex
    return f"subscription/{sub}/offering/{offering}/{object_type}"


class MqttTransport(TransportHooks):
    """Consumes MQTT topics with QoS 1, a persistent session and manual acknowledgement.

    ``protocol_version`` 5 (default; Mosquitto, RabbitMQ >= 3.13) or 4 (= MQTT 3.1.1, e.g. RabbitMQ 3.x's MQTT
    plugin). ``session_expiry`` (seconds, MQTT 5) is how long the broker keeps the session - and queues
    messages - while the daemon is away.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        topics: Sequence[str],
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        websocket_path: str | None = None,
        tls: bool = False,
        verify_tls: bool = True,
        ca_file: str | None = None,
        backoff: Backoff | None = None,
        protocol_version: int = 5,
        session_expiry: int = 86400,
        keepalive: int = 30,
        connect_timeout: float = 10.0,
        name: str = "mqtt",
    ) -> None:
        super().__init__()
        if not topics:
            raise ValueError("at least one topic is needed")
        for topic in topics:
            if not topic or "#" in topic or "+" in topic:
                raise ValueError(f"invalid topic {topic!r}: give the exact Waldur topic, no wildcards")
        if not client_id:
            raise ValueError("a stable, non-empty client_id is needed for a persistent session")
        if protocol_version not in (4, 5):
            raise ValueError("protocol_version must be 5 (MQTT 5) or 4 (MQTT 3.1.1)")
        if connect_timeout <= 0:
            raise ValueError(f"connect_timeout must be > 0, got {connect_timeout}")
        self.name = name
        self.host = host
        self.port = port
        self.topics = tuple(topics)
        self.client_id = client_id
        self.username = username
        self._password = password
        self.websocket_path = websocket_path
        self.tls = tls
        self.verify_tls = verify_tls
        self.ca_file = ca_file
        self.backoff = backoff if backoff is not None else Backoff()
        self.protocol_version = protocol_version
        self.session_expiry = session_expiry
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout

        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._client: Any = None
        self._thread: threading.Thread | None = None
        self._on_delivery: DeliveryCallback | None = None
        self._stopping = False
        self._stop_deadline = 0.0
        # state of the current network session, guarded by _lock
        self._generation = 0
        self._session_open = False  # CONNACK accepted, not yet disconnected
        self._down = threading.Event()
        self._subscribed = threading.Event()
        self._subscribe_mid: int | None = None
        self._subscribe_error: str | None = None
        self._session_present: bool | None = None
        self._connected = False
        self._ever_connected = False
        self._reconnects = 0
        self._callback_errors = 0
        self._connect_attempts = 0
        self._connect_thread_ids: set[int] = set()

    # ---------------------------------------------------------------------------------------------------------
    # public API

    def start(self, on_delivery: DeliveryCallback) -> None:
        """Start the supervisor thread, which connects, subscribes and keeps reconnecting. Does not block."""
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("MqttTransport.start() called twice")
            self._on_delivery = on_delivery
            self._client = self._make_client()
            self._thread = threading.Thread(target=self._run, name=f"{self.name}-supervisor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect (the broker keeps the session; unacknowledged messages are resent on the next session)."""
        with self._lock:
            thread = self._thread
            if thread is None or self._stopping:
                return
            self._stopping = True
            self._stop_deadline = time.monotonic() + max(timeout, 0.0)
        self._wake.set()
        if thread is not threading.current_thread():
            thread.join(max(timeout, 0.0) + self.connect_timeout)
        if thread.is_alive():
            _log.warning("broker.stop_timeout", transport=self.name)

    @property
    def connected(self) -> bool:
        """True while the session is open and the subscription is confirmed."""
        return self._connected

    @property
    def reconnects(self) -> int:
        return self._reconnects

    @property
    def alive(self) -> bool:
        """For the watchdog: the supervisor runs and, while connected, paho's loop thread too (a dead loop
        thread with ``is_connected()`` still True is the silent stall this catches)."""
        thread = self._thread
        if thread is None or not thread.is_alive() or self._stopping:
            return False
        if self._connected:
            loop_thread = getattr(self._client, "_thread", None)
            return loop_thread is not None and loop_thread.is_alive()
        return True

    @property
    def callback_errors(self) -> int:
        return self._callback_errors

    @property
    def connect_attempts(self) -> int:
        return self._connect_attempts

    @property
    def connect_thread_ids(self) -> frozenset[int]:
        return frozenset(self._connect_thread_ids)

    @property
    def session_present(self) -> bool | None:
        """The broker's ``session_present`` flag of the last CONNACK."""
        return self._session_present

    @property
    def client(self) -> Any:
        """The paho client (diagnostics and tests)."""
        return self._client

    # ---------------------------------------------------------------------------------------------------------
    # client set-up

    def _make_client(self) -> Any:
        v5 = self.protocol_version == 5
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=None if v5 else False,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            transport="websockets" if self.websocket_path is not None else "tcp",
            reconnect_on_failure=False,
            manual_ack=True,
        )
        client.suppress_exceptions = True  # second line of defence; our callbacks catch everything themselves
        client.enable_logger(logging.getLogger("cscs_storage_daemon.transports.mqtt.paho"))
        client.connect_timeout = self.connect_timeout
        if self.websocket_path is not None:
            client.ws_set_options(path=self.websocket_path)
        if self.tls:
            client.tls_set_context(make_ssl_context(self.verify_tls, self.ca_file))
            client.tls_insecure_set(not self.verify_tls)
        if self.username is not None:
            client.username_pw_set(self.username, self._password)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _connect_properties(self) -> Properties | None:
        if self.protocol_version != 5:
            return None
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry
        return props

    # ---------------------------------------------------------------------------------------------------------
    # supervisor thread

    def _run(self) -> None:
        attempt = 0
        client = self._client
        try:
            while not self._stopping:
                try:
                    attempt = self._session_once(client, attempt)
                except Exception:  # the supervisor must outlive any surprise, or nothing reconnects again
                    _log.exception("broker.supervisor_error", transport=self.name)
                    self._set_down("internal error")
                    self._close_session(client)
                    attempt = self._retry_later(attempt, "internal error")
        finally:
            self._close_session(client, graceful=True)
            self._set_down("stopped")
            _log.info("broker.stopped", transport=self.name)

    def _session_once(self, client: Any, attempt: int) -> int:
        """Connect, subscribe, wait until the session ends, then back off. Returns the next attempt number."""
        self._down.clear()
        self._subscribed.clear()
        with self._lock:
            self._subscribe_error = None
            self._connect_attempts += 1
            self._connect_thread_ids.add(threading.get_ident())
        try:
            if self.protocol_version == 5:
                rc = client.connect(
                    self.host,
                    self.port,
                    keepalive=self.keepalive,
                    clean_start=False,
                    properties=self._connect_properties(),
                )
            else:
                rc = client.connect(self.host, self.port, keepalive=self.keepalive)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise ConnectionError(mqtt.error_string(rc))
        except Exception as exc:
            return self._retry_later(attempt, f"connect: {exc}")
        client.loop_start()
        # CONNACK and SUBACK are handled on paho's loop thread.
        deadline = time.monotonic() + self.connect_timeout
        while not (self._subscribed.is_set() or self._down.is_set() or self._stopping):
            if time.monotonic() >= deadline:
                break
            self._subscribed.wait(0.05)
        if self._stopping:
            return attempt
        with self._lock:
            error = self._subscribe_error
        if self._subscribed.is_set() and not self._down.is_set() and error is None:
            self._set_up()
            while not self._stopping and not self._down.wait(0.2):
                pass
            if self._stopping:
                return 0
            self._set_down("connection lost")
            self._close_session(client)
            return self._retry_later(0, "disconnected", event="broker.reconnect_scheduled")
        self._close_session(client)
        reason = error or ("refused or closed before SUBACK" if self._down.is_set() else "no CONNACK/SUBACK in time")
        return self._retry_later(attempt, reason)

    def _retry_later(self, attempt: int, reason: str, event: str = "broker.connect_failed") -> int:
        delay = self.backoff.delay(attempt)
        _log.warning(
            event,
            transport=self.name,
            host=self.host,
            port=self.port,
            client_id=self.client_id,
            error=reason,
            attempt=attempt + 1,
            retry_in=round(delay, 3),
        )
        self._wake.clear()
        deadline = time.monotonic() + delay
        while not self._stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wake.wait(remaining)
        return attempt + 1

    def _close_session(self, client: Any, graceful: bool = False) -> None:
        try:
            if client.is_connected():
                self._down.clear()
                client.disconnect()  # MQTT DISCONNECT: the broker keeps the session (session expiry)
                if graceful:
                    remaining = max(self._stop_deadline - time.monotonic(), 0.1)
                    self._down.wait(min(remaining, 5.0))
        except Exception as exc:
            _log.debug("broker.disconnect_failed", transport=self.name, error=str(exc))
        try:
            client.loop_stop()
        except Exception as exc:
            _log.debug("broker.loop_stop_failed", transport=self.name, error=str(exc))
        with self._lock:
            self._session_open = False

    def _set_up(self) -> None:
        with self._lock:
            if self._ever_connected:
                self._reconnects += 1
            self._ever_connected = True
            self._connected = True
        _log.info(
            "broker.connected",
            transport=self.name,
            host=self.host,
            port=self.port,
            client_id=self.client_id,
            topics=list(self.topics),
            session_present=self._session_present,
            websocket_path=self.websocket_path,
            tls=self.tls,
        )
        self._fire("on_connected")

    def _set_down(self, reason: str) -> None:
        with self._lock:
            was, self._connected = self._connected, False
            self._session_open = False
        if was:
            _log.warning("broker.disconnected", transport=self.name, reason=reason, client_id=self.client_id)
            self._fire("on_disconnected")

    # ---------------------------------------------------------------------------------------------------------
    # paho callbacks (paho's loop thread): never raise

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        try:
            if reason_code.is_failure:
                _log.warning("broker.connack_refused", transport=self.name, reason=str(reason_code))
                self._down.set()
                return
            with self._lock:
                self._generation += 1
                self._session_open = True
                self._session_present = bool(getattr(flags, "session_present", False))
            if self.protocol_version == 5:
                subs: list[tuple[str, Any]] = [(t, SubscribeOptions(qos=1)) for t in self.topics]
            else:
                subs = [(t, 1) for t in self.topics]
            rc, mid = client.subscribe(subs)
            with self._lock:
                self._subscribe_mid = mid
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                _log.warning("broker.subscribe_failed", transport=self.name, error=mqtt.error_string(rc))
                self._down.set()
        except Exception:
            _log.exception("mqtt.callback_failed", callback="on_connect")
            self._down.set()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        try:
            with self._lock:
                if mid != self._subscribe_mid:
                    return
                refused = [str(rc) for rc in reason_codes if rc.is_failure]
                downgraded = [rc.value for rc in reason_codes if not rc.is_failure and rc.value < 1]
                if refused:
                    self._subscribe_error = f"subscription refused: {refused}"
                elif downgraded:
                    _log.warning("broker.subscription_downgraded", transport=self.name, granted_qos=downgraded)
            self._subscribed.set()
        except Exception:
            _log.exception("mqtt.callback_failed", callback="on_subscribe")
            self._subscribed.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        try:
            with self._lock:
                self._session_open = False
            self._down.set()
            self._wake.set()
        except Exception:
            _log.exception("mqtt.callback_failed", callback="on_disconnect")

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        try:
            try:
                topic = message.topic
            except UnicodeDecodeError:
                topic = "<undecodable topic>"
            with self._lock:
                generation = self._generation
            headers = {
                "topic": topic,
                "qos": str(message.qos),
                "mid": str(message.mid),
                "retain": "true" if message.retain else "false",
                "redelivered": "true" if message.dup else "false",
            }
            delivery = Delivery(
                transport=self.name,
                destination=topic,
                headers=headers,
                body=bytes(message.payload),
                settle=partial(self._settle, generation, message.mid, message.qos),
            )
        except Exception:
            _log.exception("mqtt.message_unreadable", transport=self.name)
            return
        try:
            callback = self._on_delivery
            if callback is not None:
                callback(delivery)
        except Exception:
            with self._lock:
                self._callback_errors += 1
            _log.exception(
                "transport.on_delivery_failed",
                transport=self.name,
                destination=delivery.destination,
                note="message left unacknowledged; the broker resends it on the next session",
            )

    def _settle(self, generation: int, mid: int, qos: int, action: Action, requeue: bool) -> bool:
        if qos == 0:
            return True  # nothing to acknowledge at QoS 0
        if action == "nack":
            _log.debug(
                "mqtt.nack_leaves_unacked",
                transport=self.name,
                mid=mid,
                note="MQTT has no NACK; the broker resends the message when the session is resumed",
            )
            return False
        with self._lock:
            if generation != self._generation or not self._session_open:
                _log.debug(
                    "mqtt.settle_skipped",
                    transport=self.name,
                    mid=mid,
                    reason="the session that delivered the message is gone; the broker will resend it",
                )
                return False
            rc = self._client.ack(mid, qos)
        return bool(rc == MQTTErrorCode.MQTT_ERR_SUCCESS)
