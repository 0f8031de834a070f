"""STOMP 1.2 transport for RabbitMQ: plain TCP (61613) or Web-STOMP (WebSocket), optional TLS.

Rules (spec events §1, each one a bug upstream hit):

- subscribe to ``/amq/queue/<name>`` only: ``/queue/<name>`` re-declares the queue and gets PRECONDITION_FAILED
  against Waldur's queue arguments (``ValueError`` here);
- STOMP 1.2 connection classes: stomp.py 9's default ``stomp.Connection`` is 1.1, whose messages carry no ``ack``
  header;
- heartbeats are given to the connection object (which runs the heartbeat thread), not only sent in CONNECT;
- ``ack: client-individual`` plus ``prefetch-count``;
- one connection per distinct (vhost, login);
- one supervisor thread per transport does every connect and reconnect, sequentially, with exponential backoff
  and jitter, forever; it re-subscribes on every reconnect. stomp.py's own reconnect loop is disabled
  (one attempt per connect) and nothing reconnects from a listener callback;
- an ERROR frame with ``not_found`` / "no queue" calls ``on_queue_missing(destination)``;
- Web-STOMP: the WebSocket is opened with UTF-8 validation switched off, so a non-UTF-8 body is delivered (the
  daemon dead-letters it) instead of closing the socket and being redelivered forever.

Listener callbacks run on stomp.py's I/O thread and never raise; they only hand frames on.
"""

from __future__ import annotations

import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import stomp
import structlog
import websocket
from stomp.adapter.ws import WSTransport
from stomp.connect import BaseConnection, StompConnection12
from stomp.exception import ConnectFailedException
from stomp.protocol import Protocol12

from .backoff import Backoff
from .base import Action, Delivery, DeliveryCallback, TransportHooks, make_ssl_context

__all__ = [
    "AMQ_QUEUE_PREFIX",
    "StompSubscription",
    "StompTransport",
    "legacy_queue_name",
    "queue_destination",
    "validate_destination",
]

_log = structlog.get_logger("cscs_storage_daemon.transports.stomp")

AMQ_QUEUE_PREFIX = "/amq/queue/"
# Mastermind parses legacy queue names with this expression: both uuids must be dash-less lowercase hex.
_LEGACY_QUEUE_RE = re.compile(r"^subscription_([a-f0-9]+)_offering_([a-f0-9]+)_(\w+)$")
_UNIFIED_QUEUE_RE = re.compile(r"^consumer_[a-f0-9]+$")
_QUEUE_NAME_RE = re.compile(r"^[A-Za-z0-9_.:\-]+$")
_NO_QUEUE_RE = re.compile(r"no queue '([^']+)'")


def _hex_uuid(value: str) -> str:
    try:
        return uuid.UUID(str(value).strip()).hex
    except ValueError as exc:
        raise ValueError(f"not a UUID: {value!r}") from exc


def legacy_queue_name(subscription_uuid: str, offering_uuid: str, object_type: str) -> str:
    """``subscription_<sub hex>_offering_<offering hex>_<type>``, dashes stripped and hex lower-cased, as
    Mastermind names (and fills) the queue. UUIDs may be given with or without dashes."""
    if not re.fullmatch(r"[a-z_]+", object_type):
        raise ValueError(f"not a Waldur object type: {object_type!r}")
    return f"subscription_{_hex_uuid(subscription_uuid)}_offering_{_hex_uuid(offering_uuid)}_{object_type}"


def validate_destination(destination: str) -> str:
    """Return ``destination`` if it is ``/amq/queue/<name>``; raise ``ValueError`` otherwise.

    ``/queue/<name>`` is refused: RabbitMQ would (re-)declare the queue and answer PRECONDITION_FAILED when its
    arguments differ from Waldur's. A legacy queue name must be the dash-less form Mastermind fills.
    """
    if destination.startswith("/queue/"):
        raise ValueError(
            f"{destination!r}: subscribe to '/amq/queue/<name>', never '/queue/<name>' - RabbitMQ re-declares "
            "a /queue/ destination and fails with PRECONDITION_FAILED against Waldur's queue arguments"
        )
    if not destination.startswith(AMQ_QUEUE_PREFIX):
        raise ValueError(f"{destination!r}: only '/amq/queue/<name>' destinations (pre-declared queues) are used")
    name = destination[len(AMQ_QUEUE_PREFIX) :]
    if not name or not _QUEUE_NAME_RE.match(name):
        raise ValueError(f"{destination!r}: invalid queue name {name!r}")
    if name.startswith("subscription_") and not _LEGACY_QUEUE_RE.match(name):
        raise ValueError(
            f"{destination!r}: legacy queue names are subscription_<hex>_offering_<hex>_<type> with dash-less "
            "lowercase uuids; Waldur never fills a queue named otherwise"
        )
    if name.startswith("consumer_") and not _UNIFIED_QUEUE_RE.match(name):
        raise ValueError(f"{destination!r}: unified queue names are consumer_<dash-less lowercase hex>")
    return destination


def queue_destination(queue_name: str) -> str:
    """``/amq/queue/<queue_name>``, validated."""
    return validate_destination(AMQ_QUEUE_PREFIX + queue_name)


@dataclass(frozen=True)
class StompSubscription:
    """One queue to consume, with the credentials of the connection that consumes it."""

    destination: str
    login: str
    passcode: str = field(repr=False)
    vhost: str = "/"

    def __post_init__(self) -> None:
        validate_destination(self.destination)
        if not self.vhost:
            raise ValueError("vhost must not be empty (use '/' for the default vhost)")

    @property
    def queue_name(self) -> str:
        return self.destination[len(AMQ_QUEUE_PREFIX) :]


# --------------------------------------------------------------------------------------------------------------
# stomp.py connection objects


class _WebStompTransport(WSTransport):  # type: ignore[misc]
    """stomp.py's WebSocket transport, but the socket is opened by us: UTF-8 validation off, our TLS context,
    and the connect timeout does not become a read timeout."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        path: str,
        vhost: str,
        connect_timeout: float,
        ssl_context: Any | None,
    ) -> None:
        super().__init__(
            [(host, port)],
            prefer_localhost=False,
            try_loopback_connect=False,
            reconnect_attempts_max=1,
            timeout=connect_timeout,
            vhost=vhost,
            auto_decode=False,
            ws_path=path,
        )
        self._cscs_target = (host, port)
        self._cscs_path = path if path.startswith("/") else "/" + path
        self._cscs_timeout = connect_timeout
        self._cscs_ssl_context = ssl_context

    def attempt_connection(self) -> None:
        self.connection_error = False
        host, port = self._cscs_target
        scheme = "wss" if self._cscs_ssl_context is not None else "ws"
        url = f"{scheme}://{host}:{port}{self._cscs_path}"
        sslopt = {"context": self._cscs_ssl_context} if self._cscs_ssl_context is not None else None
        try:
            sock = websocket.create_connection(
                url,
                timeout=self._cscs_timeout,
                sslopt=sslopt,
                # RabbitMQ Web-STOMP sends text frames; a body that is not UTF-8 must reach the daemon (which
                # dead-letters it) instead of making websocket-client close the connection.
                skip_utf8_validation=True,
            )
        except (OSError, websocket.WebSocketException) as exc:
            self.socket = None
            raise ConnectFailedException(f"{url}: {exc}") from exc
        sock.settimeout(None)  # the connect timeout must not turn into a read timeout
        self.socket = sock
        self.current_host_and_port = (host, port)


class _WebStompConnection(StompConnection12):  # type: ignore[misc]
    """A STOMP 1.2 connection over :class:`_WebStompTransport` (what ``stomp.WSStompConnection`` is, with our
    transport)."""

    def __init__(self, transport: _WebStompTransport, heartbeats: tuple[int, int]) -> None:
        BaseConnection.__init__(self, transport)
        Protocol12.__init__(self, transport, heartbeats, True, heart_beat_receive_scale=1.5)


class _ConnListener(stomp.ConnectionListener):  # type: ignore[misc]
    """Listener for one connection object. Runs on stomp.py's I/O thread: never raises, never blocks."""

    def __init__(self, owner: StompTransport, link: _Link) -> None:
        self.owner = owner
        self.link = link
        self.conn: Any = None
        self.cond = threading.Condition()
        self.connected = False
        self.closed = False
        self.errors: list[str] = []
        self.receipts: set[str] = set()

    def wait_until(self, predicate: Callable[[], bool], deadline: float) -> bool:
        with self.cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.cond.wait(min(remaining, 0.2))  # also re-checks predicates on outside state (stopping)
            return True

    def on_connected(self, frame: Any) -> None:
        with self.cond:
            self.connected = True
            self.cond.notify_all()

    def on_receipt(self, frame: Any) -> None:
        try:
            with self.cond:
                self.receipts.add(str(frame.headers.get("receipt-id", "")))
                self.cond.notify_all()
        except Exception:
            _log.exception("stomp.listener_failed", callback="on_receipt")

    def on_error(self, frame: Any) -> None:
        try:
            headers = {str(k): str(v) for k, v in frame.headers.items()}
            body = frame.body.decode("utf-8", "replace") if isinstance(frame.body, bytes) else str(frame.body)
            with self.cond:
                self.errors.append(f"{headers.get('message', '')}: {body.strip()}")
                self.cond.notify_all()
            self.owner._post(("error", self.link, self.conn, (headers, body)))
        except Exception:
            _log.exception("stomp.listener_failed", callback="on_error")

    def on_message(self, frame: Any) -> None:
        self.owner._handle_message(self.link, self.conn, frame)

    def on_disconnected(self) -> None:
        try:
            with self.cond:
                self.closed = True
                self.cond.notify_all()
            self.owner._post(("disconnected", self.link, self.conn, None))
        except Exception:
            _log.exception("stomp.listener_failed", callback="on_disconnected")

    def on_heartbeat_timeout(self) -> None:
        _log.warning("broker.heartbeat_timeout", transport=self.owner.name, **self.link.log_fields())


# --------------------------------------------------------------------------------------------------------------
# links: one connection per (vhost, login)


class _Link:
    def __init__(self, vhost: str, login: str, passcode: str, subs: tuple[StompSubscription, ...]) -> None:
        self.vhost = vhost
        self.login = login
        self.passcode = passcode
        self.subs = subs
        self.conn: Any = None
        self.listener: _ConnListener | None = None
        self.state = "down"  # down | connecting | up
        self.attempt = 0
        self.next_attempt = 0.0
        self.ever_up = False
        self.removed = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.vhost, self.login)

    def destination_for(self, subscription_id: str) -> str | None:
        for sub in self.subs:
            if sub.queue_name == subscription_id:
                return sub.destination
        return None

    def log_fields(self) -> dict[str, Any]:
        return {"vhost": self.vhost, "login": self.login, "destinations": [s.destination for s in self.subs]}


_Groups = dict[tuple[str, str], tuple[str, tuple[StompSubscription, ...]]]


def _group(subscriptions: Iterable[StompSubscription]) -> _Groups:
    groups: dict[tuple[str, str], list[StompSubscription]] = {}
    for sub in subscriptions:
        if not isinstance(sub, StompSubscription):
            raise TypeError(f"expected StompSubscription, got {type(sub).__name__}")
        groups.setdefault((sub.vhost, sub.login), []).append(sub)
    result: _Groups = {}
    for key, subs in groups.items():
        if len({s.passcode for s in subs}) != 1:
            raise ValueError(f"subscriptions for vhost {key[0]!r} / login {key[1]!r} use different passcodes")
        destinations = [s.destination for s in subs]
        if len(set(destinations)) != len(destinations):
            raise ValueError(f"duplicate destination for vhost {key[0]!r} / login {key[1]!r}: {destinations}")
        result[key] = (subs[0].passcode, tuple(subs))
    return result


Event = tuple[str, _Link, Any, Any]


class StompTransport(TransportHooks):
    """Consumes ``/amq/queue/...`` destinations over STOMP 1.2 with per-message acknowledgement.

    ``subscriptions`` are grouped by (vhost, login): one connection each (legacy mode has one login per object
    type; unified mode has one). ``websocket_path`` selects Web-STOMP (``/ws`` on RabbitMQ, ``/rmqws-stomp``
    behind Waldur's ingress). ``tls`` wraps TCP or uses ``wss://``; ``verify_tls`` checks the certificate chain
    and host name against ``ca_file`` or the system store.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        subscriptions: Sequence[StompSubscription],
        websocket_path: str | None = None,
        tls: bool = False,
        verify_tls: bool = True,
        ca_file: str | None = None,
        prefetch: int = 10,
        heartbeat_ms: int = 10000,
        backoff: Backoff | None = None,
        connect_timeout: float = 10.0,
        name: str = "stomp",
    ) -> None:
        super().__init__()
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        if heartbeat_ms < 0:
            raise ValueError(f"heartbeat_ms must be >= 0, got {heartbeat_ms}")
        if connect_timeout <= 0:
            raise ValueError(f"connect_timeout must be > 0, got {connect_timeout}")
        self.name = name
        self.host = host
        self.port = port
        self.websocket_path = websocket_path
        self.tls = tls
        self.verify_tls = verify_tls
        self.ca_file = ca_file
        self.prefetch = prefetch
        self.heartbeat_ms = heartbeat_ms
        self.backoff = backoff if backoff is not None else Backoff()
        self.connect_timeout = connect_timeout
        self._desired = _group(subscriptions)
        self._desired_changed = True

        self._lock = threading.RLock()
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._links: dict[tuple[str, str], _Link] = {}
        self._on_delivery: DeliveryCallback | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stop_deadline = 0.0
        self._connected = False
        self._reconnects = 0
        self._callback_errors = 0
        self._connect_attempts = 0
        self._connecting_now = 0
        self._max_parallel_connects = 0
        self._connect_thread_ids: set[int] = set()

    # ---------------------------------------------------------------------------------------------------------
    # public API

    def start(self, on_delivery: DeliveryCallback) -> None:
        """Start the supervisor thread, which connects and subscribes. Does not block."""
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("StompTransport.start() called twice")
            self._on_delivery = on_delivery
            self._thread = threading.Thread(target=self._run, name=f"{self.name}-supervisor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect every connection (unacknowledged messages go back to the queue) and end the supervisor."""
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
            with self._lock:
                links = list(self._links.values())
            for link in links:
                self._abandon(link.conn)

    def update_subscriptions(self, subscriptions: Sequence[StompSubscription]) -> None:
        """Replace the subscriptions (after re-registration). Connections whose (vhost, login) disappears are
        closed, new ones opened, changed ones reconnected. Validates before changing anything."""
        desired = _group(subscriptions)
        with self._lock:
            self._desired = desired
            self._desired_changed = True
        self._wake.set()

    @property
    def connected(self) -> bool:
        """True while every connection is up and subscribed."""
        return self._connected

    @property
    def reconnects(self) -> int:
        """Successful re-connections (of any connection) after its first connection."""
        return self._reconnects

    @property
    def alive(self) -> bool:
        """True while the supervisor thread runs (for the watchdog): it keeps every connection up or retrying."""
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._stopping

    @property
    def callback_errors(self) -> int:
        """How many times ``on_delivery`` raised (the message then stays unacknowledged)."""
        return self._callback_errors

    @property
    def connect_attempts(self) -> int:
        return self._connect_attempts

    @property
    def max_parallel_connects(self) -> int:
        """Highest number of connect attempts ever in progress at once (1: one reconnect loop at a time)."""
        return self._max_parallel_connects

    @property
    def connect_thread_ids(self) -> frozenset[int]:
        """Idents of the threads that ever ran a connect attempt (only the supervisor thread)."""
        return frozenset(self._connect_thread_ids)

    def stomp_connections(self) -> list[Any]:
        """The live stomp.py connection objects (for diagnostics and tests)."""
        with self._lock:
            return [link.conn for link in self._links.values() if link.conn is not None]

    # ---------------------------------------------------------------------------------------------------------
    # supervisor thread

    def _post(self, event: Event) -> None:
        self._events.put(event)
        self._wake.set()

    def _run(self) -> None:
        try:
            while True:
                self._wake.clear()  # before looking at the state: a later wake-up is never lost
                with self._lock:
                    if self._stopping:
                        break
                try:
                    timeout = self._supervise_once()
                except Exception:  # the supervisor must outlive any surprise, or nothing reconnects again
                    _log.exception("broker.supervisor_error", transport=self.name)
                    timeout = self.backoff.initial
                self._wake.wait(max(timeout, 0.0))
        finally:
            self._shutdown_links()

    def _supervise_once(self) -> float:
        """One pass: apply subscription changes, handle events, (re)connect what is due. Returns how long to
        wait before the next pass (unless woken)."""
        with self._lock:
            if self._desired_changed:
                self._apply_desired()
            links = list(self._links.values())
        self._drain_events()
        now = time.monotonic()
        for link in links:
            if self._stopping:
                break
            if link.state == "up" and link.conn is not None and not link.conn.is_connected():
                self._mark_down(link, "connection lost")
            if link.state == "down" and now >= link.next_attempt and not link.removed:
                self._connect_link(link)
                self._drain_events()
        self._update_connected()
        with self._lock:
            waits = [lk.next_attempt - time.monotonic() for lk in self._links.values() if lk.state == "down"]
        return min([1.0, *waits])

    def _apply_desired(self) -> None:
        self._desired_changed = False
        for key, link in list(self._links.items()):
            if key not in self._desired:
                link.removed = True
                self._abandon(link.conn)
                del self._links[key]
                _log.info("broker.subscription_removed", transport=self.name, **link.log_fields())
        for key, (passcode, subs) in self._desired.items():
            existing = self._links.get(key)
            if existing is None:
                self._links[key] = _Link(key[0], key[1], passcode, subs)
            elif existing.subs != subs or existing.passcode != passcode:
                existing.subs = subs
                existing.passcode = passcode
                conn, existing.conn, existing.listener = existing.conn, None, None
                existing.state = "down"
                existing.attempt = 0
                existing.next_attempt = 0.0
                self._abandon(conn)

    def _drain_events(self) -> None:
        while True:
            try:
                kind, link, conn, payload = self._events.get_nowait()
            except queue.Empty:
                return
            if kind == "error":
                self._handle_error(link, conn, payload)
            elif kind == "disconnected" and link.conn is conn and conn is not None and link.state == "up":
                self._mark_down(link, "disconnected")

    def _handle_error(self, link: _Link, conn: Any, payload: tuple[dict[str, str], str]) -> None:
        headers, body = payload
        message = headers.get("message", "")
        _log.warning("broker.error_frame", transport=self.name, message=message, detail=body[:300], **link.log_fields())
        if message.lower() == "not_found" or "no queue" in body.lower() or "NOT_FOUND" in body:
            match = _NO_QUEUE_RE.search(body)
            missing = [AMQ_QUEUE_PREFIX + match.group(1)] if match else [s.destination for s in link.subs]
            for destination in missing:
                _log.warning("broker.queue_missing", transport=self.name, destination=destination)
                self._fire("on_queue_missing", destination)
        # Any ERROR on an established connection (e.g. "Server cancelled subscription" after the queue was
        # deleted) leaves it useless: drop it and reconnect, which re-subscribes (and detects NOT_FOUND).
        if link.conn is conn and conn is not None and link.state == "up":
            self._mark_down(link, f"error frame: {message}")

    def _mark_down(self, link: _Link, reason: str) -> None:
        with self._lock:
            conn, link.conn, link.listener = link.conn, None, None
            link.state = "down"
            link.attempt = 0
            link.next_attempt = time.monotonic() + self.backoff.delay(0)
        self._abandon(conn)
        _log.warning("broker.disconnected", transport=self.name, reason=reason, **link.log_fields())

    def _connect_link(self, link: _Link) -> None:
        with self._lock:
            self._connecting_now += 1
            self._max_parallel_connects = max(self._max_parallel_connects, self._connecting_now)
            self._connect_thread_ids.add(threading.get_ident())
            self._connect_attempts += 1
        try:
            self._do_connect(link)
        finally:
            with self._lock:
                self._connecting_now -= 1

    def _do_connect(self, link: _Link) -> None:
        listener = _ConnListener(self, link)
        conn = self._make_connection(link.vhost)
        listener.conn = conn
        conn.set_listener("cscs-storage-daemon", listener)
        with self._lock:
            link.conn = conn
            link.listener = listener
            link.state = "connecting"
        deadline = time.monotonic() + self.connect_timeout
        try:
            conn.connect(link.login, link.passcode, wait=False, with_connect_command=True)
            if not listener.wait_until(
                lambda: listener.connected or listener.closed or bool(listener.errors) or self._stopping, deadline
            ):
                raise ConnectionError("no CONNECTED frame within the connect timeout")
            if listener.errors or listener.closed or not listener.connected:
                raise ConnectionError("; ".join(listener.errors) or "connection closed during CONNECT")
            receipts = []
            for sub in link.subs:
                receipt = f"subscribe-{sub.queue_name}-{uuid.uuid4().hex[:8]}"
                receipts.append(receipt)
                conn.subscribe(
                    sub.destination,
                    id=sub.queue_name,
                    ack="client-individual",
                    headers={"prefetch-count": str(self.prefetch), "receipt": receipt},
                )
            if not listener.wait_until(
                lambda: (
                    listener.closed or bool(listener.errors) or self._stopping or listener.receipts.issuperset(receipts)
                ),
                deadline,
            ):
                raise ConnectionError("SUBSCRIBE not confirmed within the connect timeout")
            # RabbitMQ answers a SUBSCRIBE to a missing queue with ERROR and then (still) the RECEIPT.
            if listener.errors or listener.closed or not conn.is_connected() or self._stopping:
                if not listener.errors and not self._stopping:
                    # Over Web-STOMP the ERROR frame can be lost with the closing socket: a connection the broker
                    # accepted and then closed on SUBSCRIBE is most likely a missing queue. Registering again is
                    # harmless if it was not.
                    for sub in link.subs:
                        _log.warning("broker.queue_missing", transport=self.name, destination=sub.destination)
                        self._fire("on_queue_missing", sub.destination)
                raise ConnectionError("; ".join(listener.errors) or "connection closed during SUBSCRIBE")
        except Exception as exc:
            with self._lock:
                if link.conn is conn:
                    link.conn, link.listener = None, None
                    link.state = "down"
                delay = self.backoff.delay(link.attempt)
                link.attempt += 1
                link.next_attempt = time.monotonic() + delay
            self._abandon(conn)
            _log.warning(
                "broker.connect_failed",
                transport=self.name,
                host=self.host,
                port=self.port,
                error=str(exc),
                attempt=link.attempt,
                retry_in=round(delay, 3),
                **link.log_fields(),
            )
            return
        with self._lock:
            if link.conn is not conn:  # replaced meanwhile (update_subscriptions)
                return
            link.state = "up"
            link.attempt = 0
            if link.ever_up:
                self._reconnects += 1
            link.ever_up = True
        _log.info(
            "broker.connected",
            transport=self.name,
            host=self.host,
            port=self.port,
            websocket_path=self.websocket_path,
            tls=self.tls,
            heartbeats=getattr(conn, "heartbeats", None),
            **link.log_fields(),
        )

    def _make_connection(self, vhost: str) -> Any:
        heartbeats = (self.heartbeat_ms, self.heartbeat_ms)
        if self.websocket_path is not None:
            ssl_context = make_ssl_context(self.verify_tls, self.ca_file) if self.tls else None
            transport = _WebStompTransport(
                self.host,
                self.port,
                path=self.websocket_path,
                vhost=vhost,
                connect_timeout=self.connect_timeout,
                ssl_context=ssl_context,
            )
            return _WebStompConnection(transport, heartbeats)
        conn = stomp.Connection12(
            host_and_ports=[(self.host, self.port)],
            prefer_localhost=False,
            try_loopback_connect=False,
            reconnect_sleep_initial=0.0,
            reconnect_sleep_increase=0.0,
            reconnect_sleep_jitter=0.0,
            reconnect_attempts_max=1,  # stomp.py's own retry loop off: the supervisor retries
            timeout=self.connect_timeout,
            heartbeats=heartbeats,
            vhost=vhost,
            auto_decode=False,
        )
        if self.tls:
            conn.set_ssl(for_hosts=[(self.host, self.port)], ca_certs=self.ca_file, verify=self.verify_tls)
        return conn

    def _update_connected(self) -> None:
        with self._lock:
            now_connected = bool(self._links) and all(lk.state == "up" for lk in self._links.values())
            changed = now_connected != self._connected
            self._connected = now_connected
        if changed:
            self._fire("on_connected" if now_connected else "on_disconnected")

    def _shutdown_links(self) -> None:
        with self._lock:
            links = list(self._links.values())
            deadline = self._stop_deadline or time.monotonic()
        for link in links:
            conn, listener = link.conn, link.listener
            link.state = "down"
            if conn is None:
                continue
            try:
                if conn.is_connected() and listener is not None:
                    conn.disconnect()  # DISCONNECT with a receipt; the socket closes when it arrives
                    listener.wait_until(lambda lst=listener: lst.closed, deadline)  # type: ignore[misc]
            except Exception as exc:
                _log.debug("broker.disconnect_failed", transport=self.name, error=str(exc))
            self._abandon(conn)
            link.conn = None
            link.listener = None
        with self._lock:
            was_connected, self._connected = self._connected, False
        if was_connected:
            self._fire("on_disconnected")
        _log.info("broker.stopped", transport=self.name)

    @staticmethod
    def _abandon(conn: Any) -> None:
        """Close a connection object for good, whatever its state (unacked messages go back to the queue)."""
        if conn is None:
            return
        try:
            conn.transport.disconnect_socket()
        except Exception as exc:
            _log.debug("broker.close_failed", error=str(exc))

    # ---------------------------------------------------------------------------------------------------------
    # receiver side (stomp.py I/O thread)

    def _handle_message(self, link: _Link, conn: Any, frame: Any) -> None:
        try:
            headers = {str(k): str(v) for k, v in frame.headers.items()}
            body = frame.body
            if body is None:
                body = b""
            elif isinstance(body, str):
                body = body.encode("utf-8")
            destination = link.destination_for(headers.get("subscription", "")) or headers.get("destination", "")
            delivery = Delivery(
                transport=self.name,
                destination=destination,
                headers=headers,
                body=body,
                settle=partial(self._settle, link, conn, headers.get("ack")),
            )
        except Exception:
            _log.exception("stomp.message_unreadable", transport=self.name)
            return
        callback = self._on_delivery
        if callback is None:
            return
        try:
            callback(delivery)
        except Exception:
            with self._lock:
                self._callback_errors += 1
            _log.exception(
                "transport.on_delivery_failed",
                transport=self.name,
                destination=delivery.destination,
                note="message left unacknowledged; the broker redelivers it on the next connection",
            )

    def _settle(self, link: _Link, conn: Any, ack_id: str | None, action: Action, requeue: bool) -> bool:
        if ack_id is None:
            _log.warning("stomp.no_ack_header", transport=self.name, action=action)
            return False
        with self._lock:
            live = link.conn is conn and link.state != "down"
        if not live or not conn.is_connected():
            _log.debug(
                "stomp.settle_skipped",
                transport=self.name,
                action=action,
                reason="the connection that delivered the message is gone; the broker will redeliver it",
            )
            return False
        if action == "ack":
            conn.ack(ack_id)
        else:
            conn.nack(ack_id, requeue="true" if requeue else "false")
        return True
