"""What every transport hands to the daemon, and the interface the daemon programs against.

A transport only delivers and acknowledges. ``on_delivery`` is called on the transport's receiver thread and
must only enqueue the :class:`Delivery` (the daemon's worker handles it and calls :meth:`Delivery.ack` later,
from any thread). A transport survives any exception ``on_delivery`` raises.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable, Mapping
from typing import Literal, Protocol, runtime_checkable

import structlog

__all__ = [
    "ConnectionHook",
    "Delivery",
    "DeliveryCallback",
    "QueueMissingHook",
    "SettleFunction",
    "Transport",
    "TransportHooks",
    "make_ssl_context",
]

_log = structlog.get_logger("cscs_storage_daemon.transports")

Action = Literal["ack", "nack"]
#: ``settle(action, requeue) -> sent``: sends ACK / NACK on the connection that delivered the message.
SettleFunction = Callable[[Action, bool], bool]
DeliveryCallback = Callable[["Delivery"], None]
ConnectionHook = Callable[[], None]
QueueMissingHook = Callable[[str], None]


class Delivery:
    """One message as received from a broker.

    ``headers`` are the broker's headers as strings (STOMP: the MESSAGE frame headers, including ``ack``,
    ``redelivered``, ``destination: /queue/<name>``; MQTT: ``topic``, ``qos``, ``mid``, ``retain``,
    ``redelivered``). ``destination`` is what the transport subscribed to (``/amq/queue/<name>`` or the MQTT
    topic). ``body`` is the exact bytes received.

    :meth:`ack` and :meth:`nack` are thread-safe and idempotent: only the first call does anything. If the
    connection that delivered the message is gone they do nothing (debug log) and return ``False``: the broker
    redelivers the message on the new connection.
    """

    __slots__ = ("_lock", "_outcome", "_settle", "body", "destination", "headers", "received_at", "transport")

    def __init__(
        self,
        *,
        transport: str,
        destination: str,
        headers: Mapping[str, str],
        body: bytes,
        received_at: float | None = None,
        settle: SettleFunction | None = None,
    ) -> None:
        self.transport = transport
        self.destination = destination
        self.headers: dict[str, str] = dict(headers)
        self.body = bytes(body)
        self.received_at = time.time() if received_at is None else received_at
        self._settle = settle
        self._lock = threading.Lock()
        self._outcome: Action | None = None

    @property
    def outcome(self) -> Action | None:
        """``"ack"`` / ``"nack"`` once settled (whether or not the frame could be sent), else ``None``."""
        return self._outcome

    @property
    def redelivered(self) -> bool:
        """True if the broker flagged this as a redelivery (STOMP ``redelivered``, MQTT DUP)."""
        return self.headers.get("redelivered", "false").lower() == "true"

    def ack(self) -> bool:
        """Acknowledge: the broker forgets the message. Returns True if the ACK was sent."""
        return self._finish("ack", True)

    def nack(self, requeue: bool = True) -> bool:
        """Reject. STOMP: NACK (``requeue:false`` dead-letters it). MQTT has no NACK: the message stays
        unacknowledged and the broker resends it when the session is resumed. Returns True if a frame was sent.
        """
        return self._finish("nack", requeue)

    def _finish(self, action: Action, requeue: bool) -> bool:
        with self._lock:
            if self._outcome is not None:
                _log.debug(
                    "delivery.already_settled",
                    transport=self.transport,
                    destination=self.destination,
                    outcome=self._outcome,
                    requested=action,
                )
                return False
            self._outcome = action
        if self._settle is None:
            return False
        try:
            return self._settle(action, requeue)
        except Exception as exc:  # a broken connection must never reach the worker
            _log.debug("delivery.settle_failed", transport=self.transport, destination=self.destination, error=str(exc))
            return False

    def __repr__(self) -> str:
        return (
            f"Delivery(transport={self.transport!r}, destination={self.destination!r}, "
            f"bytes={len(self.body)}, outcome={self._outcome!r})"
        )


@runtime_checkable
class Transport(Protocol):
    """The interface the daemon uses. Hooks are plain attributes, called on a transport thread; they must be
    cheap (hand work to the daemon's loop) and their exceptions are logged and swallowed.

    - ``on_connected()``: every time the transport becomes connected (first connect and every reconnect, after
      the subscriptions are confirmed) - the daemon reconciles.
    - ``on_disconnected()``: every time it stops being connected.
    - ``on_queue_missing(destination)``: the broker said the queue does not exist (``NOT_FOUND``); the daemon
      re-registers and calls ``update_subscriptions`` where the transport has it. MQTT never calls it.
    """

    name: str
    on_connected: ConnectionHook | None
    on_disconnected: ConnectionHook | None
    on_queue_missing: QueueMissingHook | None

    def start(self, on_delivery: DeliveryCallback) -> None: ...

    def stop(self, timeout: float = 10.0) -> None: ...

    @property
    def connected(self) -> bool: ...

    @property
    def reconnects(self) -> int: ...


class TransportHooks:
    """Hook attributes plus a safe way to call them (shared by the transports)."""

    name: str = "transport"

    def __init__(self) -> None:
        self.on_connected: ConnectionHook | None = None
        self.on_disconnected: ConnectionHook | None = None
        self.on_queue_missing: QueueMissingHook | None = None

    def _fire(self, hook_name: str, *args: str) -> None:
        hook = getattr(self, hook_name, None)
        if hook is None:
            return
        try:
            hook(*args)
        except Exception:
            _log.exception("transport.hook_failed", transport=self.name, hook=hook_name)


def make_ssl_context(verify: bool, ca_file: str | None = None) -> ssl.SSLContext:
    """A client TLS context. ``verify=True``: certificate chain and host name are checked against ``ca_file``
    or the system store; ``verify=False``: encryption only (no certificate or host name check)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
