"""Test publishers that send exactly as Waldur Mastermind does, and a small RabbitMQ management helper.

STOMP (reference waldur-events §6.3): one fresh STOMP 1.2 TCP connection per message; CONNECT with
``accept-version:1.2``, ``host:<vhost>``, login, passcode, ``heart-beat:10000,10000``; one SEND to
``/amq/queue/<name>`` with exactly ``persistent``, ``durable``, ``auto-delete``, ``content-type``,
``x-message-id`` (first 32 hex of sha256("<vhost>:<topic>:<body>")) and ``content-length``; then DISCONNECT.
No ``receipt`` header on SEND: RabbitMQ would copy it into the delivered MESSAGE, which Waldur never causes.

MQTT (§6.4): old Mastermind published with MQTT 3.1.1, a clean session, QoS 0 and no retain.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
import urllib.parse
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import stomp
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from cscs_storage_daemon.transports.base import make_ssl_context

__all__ = [
    "WALDUR_QUEUE_ARGUMENTS",
    "RabbitManagement",
    "mastermind_topic_for_queue",
    "publish_mqtt_like_waldur",
    "publish_stomp_like_waldur",
    "waldur_message_id",
]

#: Queue arguments Mastermind sets when it creates a subscription queue (reference waldur-events §1.2).
WALDUR_QUEUE_ARGUMENTS: dict[str, Any] = {
    "x-message-ttl": 3600000,
    "x-max-length": 10000,
    "x-overflow": "reject-publish-dlx",
    "x-dead-letter-exchange": "",
    "x-dead-letter-routing-key": "waldur.dlq.messages",
}

_LEGACY_QUEUE_RE = re.compile(r"^subscription_([a-f0-9]+)_offering_([a-f0-9]+)_(\w+)$")


def _as_bytes(body: str | bytes) -> bytes:
    return body.encode("utf-8") if isinstance(body, str) else bytes(body)


def mastermind_topic_for_queue(queue_name: str) -> str:
    """Mastermind's internal topic for a queue: ``subscription/S/offering/O/T`` for a legacy queue
    ``subscription_S_offering_O_T``; the queue name itself for a unified ``consumer_<uuid>`` queue."""
    match = _LEGACY_QUEUE_RE.match(queue_name)
    if match:
        return f"subscription/{match.group(1)}/offering/{match.group(2)}/{match.group(3)}"
    return queue_name


def waldur_message_id(vhost: str, topic: str, body: str | bytes) -> str:
    """``x-message-id``: the first 32 hex digits of sha256("<vhost>:<topic>:<body>")."""
    return hashlib.sha256(f"{vhost}:{topic}:".encode() + _as_bytes(body)).hexdigest()[:32]


class _Disconnected(stomp.ConnectionListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.done = threading.Event()
        self.errors: list[str] = []

    def on_error(self, frame: Any) -> None:
        self.errors.append(f"{frame.headers.get('message', '')}: {frame.body!r}")

    def on_disconnected(self) -> None:
        self.done.set()


def publish_stomp_like_waldur(
    host: str,
    port: int,
    vhost: str,
    login: str,
    passcode: str,
    queue_name: str,
    body: str | bytes,
    *,
    topic: str | None = None,
    timeout: float = 10.0,
) -> str:
    """Publish one message as Mastermind does; returns the ``x-message-id`` sent.

    ``body`` is sent byte-for-byte (a ``str`` as UTF-8). ``topic`` (for the message id) defaults to the
    Mastermind topic derived from ``queue_name``. Like RabbitMQ itself, this does not tell whether the queue
    exists: a SEND to a missing ``/amq/queue/`` is dropped silently.
    """
    data = _as_bytes(body)
    message_id = waldur_message_id(vhost, topic or mastermind_topic_for_queue(queue_name), data)
    listener = _Disconnected()
    conn = stomp.Connection12(
        host_and_ports=[(host, port)],
        prefer_localhost=False,
        try_loopback_connect=False,
        reconnect_attempts_max=1,
        timeout=timeout,
        heartbeats=(10000, 10000),
        vhost=vhost,
        auto_decode=False,
    )
    conn.set_listener("publisher", listener)
    try:
        conn.connect(login, passcode, wait=True, with_connect_command=True)
        headers = {
            "persistent": "true",
            "durable": "true",
            "auto-delete": "false",
            "x-message-id": message_id,
            "content-length": str(len(data)),
        }
        conn.send("/amq/queue/" + queue_name, data, content_type="application/json", headers=headers)
        conn.disconnect()  # DISCONNECT with a receipt: RabbitMQ has routed the SEND when it answers
        if not listener.done.wait(timeout):
            raise TimeoutError(f"no DISCONNECT receipt from {host}:{port} within {timeout}s")
    finally:
        try:
            conn.transport.disconnect_socket()
        except Exception:  # noqa: S110 - already closed is fine
            pass
    if listener.errors:
        raise RuntimeError(f"broker refused the publish: {listener.errors}")
    return message_id


def publish_mqtt_like_waldur(
    host: str,
    port: int,
    topic: str,
    body: str | bytes,
    *,
    username: str | None = None,
    password: str | None = None,
    qos: int = 0,
    websocket_path: str | None = None,
    tls: bool = False,
    verify_tls: bool = True,
    ca_file: str | None = None,
    timeout: float = 10.0,
) -> None:
    """Publish one message as old Mastermind did (MQTT 3.1.1, clean session, QoS 0 by default, no retain).

    ``qos=1`` for tests that need the broker to queue the message for an offline persistent session (a QoS 0
    publish is at-most-once whatever the subscriber asks for). ``username`` on RabbitMQ is ``<vhost>:<user>``.
    """
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id="",
        clean_session=True,
        protocol=mqtt.MQTTv311,
        transport="websockets" if websocket_path is not None else "tcp",
    )
    if websocket_path is not None:
        client.ws_set_options(path=websocket_path)
    if tls:
        client.tls_set_context(make_ssl_context(verify_tls, ca_file))
        client.tls_insecure_set(not verify_tls)
    if username is not None:
        client.username_pw_set(username, password)
    connected = threading.Event()
    client.on_connect = lambda c, u, flags, rc, props: connected.set() if not rc.is_failure else None
    client.connect(host, port, keepalive=60)
    client.loop_start()
    try:
        if not connected.wait(timeout):
            raise TimeoutError(f"MQTT broker {host}:{port} did not accept the connection within {timeout}s")
        info = client.publish(topic, _as_bytes(body), qos=qos, retain=False)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise RuntimeError(f"publish failed: {mqtt.error_string(info.rc)}")
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise TimeoutError(f"publish to {topic} not completed within {timeout}s")
        # QoS 0 has no acknowledgement: let the bytes leave before DISCONNECT.
        time.sleep(0.05 if qos == 0 else 0)
    finally:
        client.disconnect()
        client.loop_stop()


class RabbitManagement:
    """Just enough of the RabbitMQ management HTTP API for tests: vhosts, users, permissions, queues."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:15672",
        user: str = "guest",
        password: str = "guest",  # noqa: S107 - RabbitMQ's local default account, for tests only
    ) -> None:
        self._http = httpx.Client(base_url=url.rstrip("/") + "/api", auth=(user, password), timeout=10.0)
        self.admin_user = user

    @staticmethod
    def _q(name: str) -> str:
        return urllib.parse.quote(name, safe="")

    def _check(self, response: httpx.Response, *ok: int) -> httpx.Response:
        if response.status_code not in ok:
            raise RuntimeError(
                f"{response.request.method} {response.request.url}: {response.status_code} {response.text}"
            )
        return response

    def put_vhost(self, vhost: str) -> None:
        """Create a vhost and give the admin user full permissions on it."""
        self._check(self._http.put(f"/vhosts/{self._q(vhost)}"), 201, 204)
        self.put_permissions(vhost, self.admin_user)

    def delete_vhost(self, vhost: str) -> None:
        self._check(self._http.delete(f"/vhosts/{self._q(vhost)}"), 204, 404)

    def put_user(self, user: str, password: str) -> None:
        self._check(self._http.put(f"/users/{self._q(user)}", json={"password": password, "tags": ""}), 201, 204)

    def delete_user(self, user: str) -> None:
        self._check(self._http.delete(f"/users/{self._q(user)}"), 204, 404)

    def put_permissions(self, vhost: str, user: str) -> None:
        body = {"configure": ".*", "write": ".*", "read": ".*"}
        self._check(self._http.put(f"/permissions/{self._q(vhost)}/{self._q(user)}", json=body), 201, 204)

    def declare_waldur_queue(self, vhost: str, queue_name: str) -> None:
        """Declare a durable queue with Mastermind's arguments (PUT /api/queues/<vhost>/<name>)."""
        body = {"durable": True, "auto_delete": False, "arguments": dict(WALDUR_QUEUE_ARGUMENTS)}
        self._check(self._http.put(f"/queues/{self._q(vhost)}/{self._q(queue_name)}", json=body), 201, 204)

    def delete_queue(self, vhost: str, queue_name: str) -> None:
        self._check(self._http.delete(f"/queues/{self._q(vhost)}/{self._q(queue_name)}"), 204, 404)

    def get_queue(self, vhost: str, queue_name: str) -> dict[str, Any]:
        """The queue's management record (``messages``, ``messages_ready``, ``messages_unacknowledged``, ...)."""
        data: dict[str, Any] = self._check(
            self._http.get(f"/queues/{self._q(vhost)}/{self._q(queue_name)}"), 200
        ).json()
        return data

    def connections(self, vhost: str | None = None) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self._check(self._http.get("/connections"), 200).json()
        return [row for row in rows if vhost is None or row.get("vhost") == vhost]

    def close(self) -> None:
        self._http.close()
