"""A fake Waldur: a real HTTP server on loopback that serves the slice of the REST API the daemon uses.

It is no more forgiving than Waldur: exact success codes (201 for creates, 204 for deletes), 401 without the right
``Authorization: Token <token>``, 404 ``{"detail": "Not found."}`` for unknown objects, 404 ``Invalid page.`` past
the last page, 405 for a wrong method, a 301 (never followed by the client) for a path without its trailing slash,
409 ``Valid states for operation: ...`` for a wrong order transition, 400 for a body that is not JSON, and list
bodies as bare JSON arrays with ``X-Result-Count`` and ``Link`` headers shaped like Waldur's.

Faults (error statuses, 429 with ``Retry-After``, slow answers, dropped connections, hangs) are injected either at a
seeded random rate (`Faults`) or as a script for the next requests (`FakeWaldur.fail_next`).

Usage::

    with FakeWaldur() as fake:
        offering = fake.add_offering(slug="capstor")
        resource = fake.add_resource(offering.uuid, slug="msclimate-store")
        gateway = WaldurGateway(fake.url, fake.token)
"""

from __future__ import annotations

import copy
import json
import random
import re
import socket
import threading
import uuid as uuid_mod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import httpx

from cscs_storage_daemon.testing.sample_data import (
    ORDER_STATES,
    ORDER_TYPES,
    RESOURCE_STATES,
    Offering,
    Project,
    make_order,
    make_resource,
    now_iso,
)

#: Mastermind's queue arguments (reference waldur-events §1.2); classic queue, no x-expires.
QUEUE_ARGUMENTS: dict[str, Any] = {
    "x-message-ttl": 3600000,
    "x-max-length": 10000,
    "x-overflow": "reject-publish-dlx",
    "x-dead-letter-exchange": "",
    "x-dead-letter-routing-key": "waldur.dlq.messages",
}

#: Waldur's ObservableObjectType values (as in waldur-api-client 8.1.3's ObservableObjectTypeEnum).
OBSERVABLE_OBJECT_TYPES = frozenset(
    {
        "call",
        "course_account",
        "importable_resources",
        "offering_resources_sync",
        "offering_user",
        "order",
        "proposal",
        "resource",
        "resource_api_key_rotation",
        "resource_end_date_change_request",
        "resource_periodic_limits",
        "service_account",
        "service_provider_account",
        "service_provider_project_group",
        "user_lifecycle",
        "user_profile",
        "user_role",
        "user_ssh_key",
    }
)

DEFAULT_PAGE_SIZE = 10  # Waldur's LinkHeaderPagination default
MAX_PAGE_SIZE = 300  # and its cap (the client's sync_all asks for 100)

FaultKind = Literal["error", "throttle", "slow", "drop", "hang"]
ScriptedFault = int | Literal["drop", "hang", "slow"]

_UUID_SEGMENT = r"(?P<uuid>[^/]+)"
_TERMINAL_ORDER_STATES = frozenset({"done", "erred", "canceled", "rejected"})


_CLIENT_ERROR_DETAILS = {
    400: "Bad request.",
    401: "Invalid token.",
    403: "You do not have permission to perform this action.",
    404: "Not found.",
    409: "Conflict.",
}


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class HttpError(Exception):
    """Raised by endpoint code to answer with an error status and a JSON body."""

    def __init__(self, status: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = dict(headers or {})


def _not_found() -> HttpError:
    return HttpError(404, {"detail": "Not found."})


def _invalid_state(valid: Sequence[str]) -> HttpError:
    return HttpError(409, {"detail": f"Valid states for operation: {', '.join(valid)}."})


@dataclass
class Faults:
    """Random fault injection; every rate is a probability per request (0 ≤ rate ≤ 1).

    Checked in this order, at most one fault per request: drop (close the socket without an answer), hang (sleep
    ``hang_seconds``, then close without an answer), error (one of ``error_statuses``), throttle (429 with
    ``Retry-After: retry_after``), slow (sleep ``delay`` seconds, then answer normally).
    Paths starting with one of ``exempt_paths`` never get a fault; when ``only_paths`` is set, only paths starting
    with one of them do.
    """

    error_rate: float = 0.0
    error_statuses: tuple[int, ...] = (500, 502, 503)
    throttle_rate: float = 0.0
    retry_after: int = 1
    slow_rate: float = 0.0
    delay: float = 0.0
    drop_rate: float = 0.0
    hang_rate: float = 0.0
    hang_seconds: float = 30.0
    exempt_paths: tuple[str, ...] = ()
    only_paths: tuple[str, ...] | None = None

    def applies_to(self, path: str) -> bool:
        if any(path.startswith(prefix) for prefix in self.exempt_paths):
            return False
        if self.only_paths is not None:
            return any(path.startswith(prefix) for prefix in self.only_paths)
        return True


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake saw it (headers are not kept: they hold the token)."""

    method: str
    path: str
    query: dict[str, list[str]]
    status: int | None  # None: no answer was sent (dropped or hung connection)
    fault: str | None = None
    body: Any = None


@dataclass
class _Request:
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: Mapping[str, str]
    body: bytes
    host: str

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.query if key == name]

    def last(self, name: str) -> str | None:
        values = self.values(name)
        return values[-1] if values else None


@dataclass
class _Reply:
    status: int
    body: Any = None  # JSON-serialisable, or bytes sent as they are
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    action: Literal["answer", "drop", "hang"] = "answer"
    delay: float = 0.0
    fault: str | None = None


Handler = Callable[[_Request, dict[str, str]], _Reply]


def _hex(value: str) -> str | None:
    """Hex form of a dashed or plain uuid string, None when it is not one."""
    try:
        return uuid_mod.UUID(value).hex
    except (ValueError, AttributeError, TypeError):
        return None


def _require_hex(value: str | uuid_mod.UUID) -> str:
    if isinstance(value, uuid_mod.UUID):
        return value.hex
    result = _hex(value)
    if result is None:
        raise ValueError(f"not a uuid: {value!r}")
    return result


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], fake: FakeWaldur) -> None:
        self.fake = fake
        self.connections: set[socket.socket] = set()
        self.accepted = 0
        self.connections_lock = threading.Lock()
        super().__init__(address, _RequestHandler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        # http.server writes the headers and the body separately; without TCP_NODELAY Nagle + delayed ACK stall
        # every answer by ~40 ms on loopback.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.connections_lock:
            self.connections.add(sock)
            self.accepted += 1
        return sock, address

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_all_connections(self) -> None:
        with self.connections_lock:
            sockets = list(self.connections)
            self.connections.clear()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeWaldur/1"
    sys_version = ""
    timeout = 60  # idle keep-alive connections end after a minute
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _serve(self) -> None:
        fake = self.server.fake
        body = self._read_body()
        if body is None:
            return
        split = urlsplit(self.path)
        request = _Request(
            method=self.command,
            path=split.path,
            query=parse_qsl(split.query, keep_blank_values=True),
            headers={key.lower(): value for key, value in self.headers.items()},
            body=body,
            host=self.headers.get("Host") or f"{fake.host}:{fake.port}",
        )
        reply = fake._handle(request)
        if reply.action == "drop":
            self._drop()
            return
        if reply.action == "hang":
            fake._stopping.wait(reply.delay)
            self._drop()
            return
        if reply.delay > 0:
            fake._stopping.wait(reply.delay)
        self._write(reply)

    def _read_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    self.close_connection = True
                    return None
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
        length = self.headers.get("Content-Length")
        if not length:
            return b""
        try:
            count = int(length)
        except ValueError:
            self.close_connection = True
            return None
        return self.rfile.read(count) if count > 0 else b""

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _write(self, reply: _Reply) -> None:
        if isinstance(reply.body, bytes):
            payload = reply.body
        elif reply.body is None:
            payload = b""
        else:
            payload = json.dumps(reply.body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if self.command == "HEAD":
            length = len(payload)
            payload = b""
        else:
            length = len(payload)
        lines = [f"HTTP/1.1 {reply.status} {_phrase(reply.status)}"]
        headers: dict[str, str] = {}
        if reply.status != 204:
            headers["Content-Type"] = reply.content_type
        headers["Content-Length"] = str(length if reply.status != 204 else 0)
        headers["Vary"] = "Accept, Cookie"
        headers.update(reply.headers)
        if self.close_connection:
            headers["Connection"] = "close"
        lines.extend(f"{key}: {value}" for key, value in headers.items())
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (payload if reply.status != 204 else b"")
        try:
            self.wfile.write(raw)
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    do_GET = _serve
    do_POST = _serve
    do_PUT = _serve
    do_PATCH = _serve
    do_DELETE = _serve
    do_HEAD = _serve
    do_OPTIONS = _serve


class FakeWaldur:
    """The fake server. Binds at construction (so `.url` is known at once) and serves once started."""

    def __init__(
        self,
        *,
        token: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 0,
        faults: Faults | None = None,
        default_page_size: int = DEFAULT_PAGE_SIZE,
        max_page_size: int = MAX_PAGE_SIZE,
        user_uuid: str | None = None,
        username: str = "cscs-storage-agent",
        provision_rabbitmq: bool = False,
        rabbitmq_api: str = "http://127.0.0.1:15672",
        rabbitmq_user: str = "guest",
        rabbitmq_password: str = "guest",  # noqa: S107 - the local test broker's default account
        cleanup_rabbitmq: bool = True,
    ) -> None:
        rng = random.Random(f"fake-waldur:{seed}")
        self.token = token or f"{rng.getrandbits(160):040x}"
        self.host = host
        self.seed = seed
        self.default_page_size = default_page_size
        self.max_page_size = max_page_size
        # Broker-visible names (vhost = user uuid, RabbitMQ users) are random, not seeded: two fakes running at
        # the same time against one broker must not share them.
        self.user_uuid = _require_hex(user_uuid) if user_uuid else uuid_mod.uuid4().hex
        self.username = username
        # Listing quirks, to show what a broken server does to a client.
        self.omit_link = False
        self.omit_result_count = False
        self.result_count_delta = 0

        self._lock = threading.RLock()
        self._faults = faults or Faults()
        self._fault_rng = random.Random(seed)
        self._script: list[ScriptedFault] = []
        self._requests: list[RecordedRequest] = []
        self.server_errors: list[BaseException] = []

        self._offerings: dict[str, dict[str, Any]] = {}
        self._offering_info: dict[str, Offering] = {}
        self._resources: dict[str, dict[str, Any]] = {}
        self._by_offering: dict[str, dict[str, None]] = {}
        self._orders: dict[str, dict[str, Any]] = {}
        self._listing_cache: dict[tuple[Any, ...], list[str]] = {}
        self._version = 0
        self._uuid_rng = random.Random(f"fake-waldur-uuids:{seed}")

        self._identities: dict[str, dict[str, Any]] = {}
        self._subscriptions: dict[str, dict[str, Any]] = {}
        self._subscription_queues: dict[str, dict[str, Any]] = {}
        self._consumers: dict[str, dict[str, Any]] = {}  # identity uuid -> unified queue registration
        self._services: dict[str, dict[str, Any]] = {}
        self.rabbit: RabbitProvisioner | None = (
            RabbitProvisioner(rabbitmq_api, rabbitmq_user, rabbitmq_password) if provision_rabbitmq else None
        )
        self.cleanup_rabbitmq = cleanup_rabbitmq

        self._stopping = threading.Event()
        self._server = _Server((host, port), self)
        self.port: int = self._server.server_address[1]
        self._thread: threading.Thread | None = None
        self._routes = self._build_routes()

    # -- lifecycle ------------------------------------------------------------------------------------------------

    @property
    def root(self) -> str:
        """``http://127.0.0.1:PORT`` (what the golden files call ``https://waldur.example.com``)."""
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The API URL as a Waldur offering config spells it: ``http://127.0.0.1:PORT/api/``."""
        return f"{self.root}/api/"

    def start(self) -> FakeWaldur:
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-waldur", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.close_all_connections()
        self._server.server_close()
        if self.rabbit is not None:
            if self.cleanup_rabbitmq:
                self.rabbit.cleanup()
            self.rabbit.close()

    def __enter__(self) -> FakeWaldur:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults ---------------------------------------------------------------------------------------------------

    @property
    def faults(self) -> Faults:
        return self._faults

    @faults.setter
    def faults(self, value: Faults) -> None:
        with self._lock:
            self._faults = value

    def set_faults(self, **changes: Any) -> Faults:
        """Change some fault settings at runtime, e.g. ``fake.set_faults(error_rate=0.2)``."""
        with self._lock:
            self._faults = replace(self._faults, **changes)
            return self._faults

    def clear_faults(self) -> None:
        with self._lock:
            self._faults = Faults()
            self._script.clear()

    def reseed(self, seed: int) -> None:
        with self._lock:
            self._fault_rng = random.Random(seed)

    def fail_next(self, *faults: ScriptedFault) -> None:
        """Script the next requests (that faults apply to): an HTTP status (429 gets ``Retry-After``), ``"drop"``,
        ``"hang"`` or ``"slow"``; each request takes the next item, then requests are served normally again."""
        for item in faults:
            if not (isinstance(item, int) or item in ("drop", "hang", "slow")):
                raise ValueError(f"unknown scripted fault {item!r}")
        with self._lock:
            self._script.extend(faults)

    def _pick_fault(self, path: str) -> _Reply | None:
        with self._lock:
            faults = self._faults
            if not faults.applies_to(path):
                return None
            item: ScriptedFault | None
            if self._script:
                item = self._script.pop(0)
            else:
                item = self._random_fault(faults)
            if item is None:
                return None
        if item == "drop":
            return _Reply(0, action="drop", fault="drop")
        if item == "hang":
            return _Reply(0, action="hang", delay=faults.hang_seconds, fault="hang")
        if item == "slow":
            return None if faults.delay <= 0 else _Reply(0, delay=faults.delay, fault="slow")
        status = int(item)
        if status == 429:
            return _Reply(
                429,
                {"detail": f"Request was throttled. Expected available in {faults.retry_after} seconds."},
                headers={"Retry-After": str(faults.retry_after)},
                fault="throttle",
            )
        if 400 <= status < 500:
            detail = _CLIENT_ERROR_DETAILS.get(status, HTTPStatus(status).phrase + ".")
            return _Reply(status, {"detail": detail}, fault="error")
        return _Reply(
            status,
            f"<h1>{_phrase(status)} ({status})</h1>".encode(),
            content_type="text/html; charset=utf-8",
            fault="error",
        )

    def _random_fault(self, faults: Faults) -> ScriptedFault | None:
        rng = self._fault_rng
        if faults.drop_rate and rng.random() < faults.drop_rate:
            return "drop"
        if faults.hang_rate and rng.random() < faults.hang_rate:
            return "hang"
        if faults.error_rate and rng.random() < faults.error_rate:
            return faults.error_statuses[rng.randrange(len(faults.error_statuses))]
        if faults.throttle_rate and rng.random() < faults.throttle_rate:
            return 429
        if faults.slow_rate and rng.random() < faults.slow_rate:
            return "slow"
        return None

    # -- recorded requests ----------------------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def accepted_connections(self) -> int:
        """How many TCP connections the server accepted (keep-alive reuses one)."""
        return self._server.accepted

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def count_requests(self, method: str | None = None, path: str | None = None) -> int:
        return sum(
            1
            for r in self.requests
            if (method is None or r.method == method) and (path is None or r.path.startswith(path))
        )

    # -- state: offerings -----------------------------------------------------------------------------------------

    def new_uuid(self) -> str:
        with self._lock:
            return f"{self._uuid_rng.getrandbits(128):032x}"

    def add_offering(
        self,
        offering: Offering | str | None = None,
        slug: str | None = None,
        *,
        name: str | None = None,
        customer_uuid: str | None = None,
        customer_name: str | None = None,
        customer_slug: str | None = None,
        type: str | None = None,
    ) -> Offering:
        """Add a provider offering: an `Offering`, or a uuid (random when None) and a slug (``capstor``)."""
        if not isinstance(offering, Offering):
            changes: dict[str, Any] = {}
            if customer_uuid is not None:
                changes["provider_uuid"] = _require_hex(customer_uuid)
            if customer_name is not None:
                changes["provider_name"] = customer_name
            if customer_slug is not None:
                changes["provider_slug"] = customer_slug
            if type is not None:
                changes["type"] = type
            slug = slug or "capstor"
            offering = Offering(
                uuid=_require_hex(offering) if offering else self.new_uuid(),
                slug=slug,
                name=name or f"{slug.capitalize()} storage",
                **changes,
            )
        with self._lock:
            self._offering_info[offering.uuid] = offering
            self._offerings[offering.uuid] = offering.to_json(self.root)
            self._by_offering.setdefault(offering.uuid, {})
            self._touch()
        return offering

    def put_offering(self, offering_json: Mapping[str, Any]) -> None:
        """Store a raw offering body as it is (its ``uuid`` is the key)."""
        key = _require_hex(str(offering_json["uuid"]))
        with self._lock:
            self._offerings[key] = copy.deepcopy(dict(offering_json))
            self._touch()

    def offering(self, uuid: str) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._offerings[_require_hex(uuid)])

    # -- state: resources -----------------------------------------------------------------------------------------

    def add_resource(
        self,
        offering_uuid: str,
        *,
        slug: str | None = None,
        uuid: str | None = None,
        name: str | None = None,
        state: str = "OK",
        storage: float | int | None = 10,
        data_type: str | None = "store",
        permissions: str | None = "2770",
        options: Mapping[str, Any] | None = None,
        backend_id: str | None = None,
        backend_metadata: Mapping[str, Any] | None = None,
        customer_slug: str = "mch",
        customer_name: str = "MeteoSwiss",
        project_slug: str = "msclimate",
        project_name: str = "MeteoSwiss climate",
        end_date: str | None = None,
    ) -> dict[str, Any]:
        """Build a resource of a known offering (customer/project uuids derive from their slugs) and store it."""
        with self._lock:
            info = self._offering_info[_require_hex(offering_uuid)]
        key = _require_hex(uuid) if uuid else self.new_uuid()
        customer_uuid = uuid_mod.uuid5(uuid_mod.NAMESPACE_URL, f"customer:{customer_slug}").hex
        project = Project(
            uuid=uuid_mod.uuid5(uuid_mod.NAMESPACE_URL, f"project:{customer_slug}/{project_slug}").hex,
            slug=project_slug,
            name=project_name,
            customer_uuid=customer_uuid,
            customer_slug=customer_slug,
            customer_name=customer_name,
        )
        created = now_iso()
        resource = make_resource(
            info,
            project,
            uuid=key,
            slug=slug or f"{project_slug}-{data_type or 'store'}-{key[:6]}",
            name=name,
            state=state,
            storage=storage,
            data_type=data_type,
            permissions=permissions,
            options=options,
            backend_id=backend_id,
            backend_metadata=backend_metadata,
            end_date=end_date,
            created=created,
            base_url=self.root,
        )
        self.put_resource(resource)
        return copy.deepcopy(resource)

    def put_resource(self, resource: Mapping[str, Any]) -> None:
        """Store a raw resource body as it is (its ``uuid`` is the key, ``offering_uuid`` its offering)."""
        self.put_resources([resource])

    def put_resources(self, resources: Iterable[Mapping[str, Any]]) -> None:
        """Store many raw resource bodies (no copy is made: do not mutate them afterwards)."""
        with self._lock:
            for resource in resources:
                key = _require_hex(str(resource["uuid"]))
                old = self._resources.get(key)
                if old is not None:
                    self._by_offering.get(_hex(str(old.get("offering_uuid", ""))) or "", {}).pop(key, None)
                item = resource if isinstance(resource, dict) else dict(resource)
                self._resources[key] = item
                offering_key = _hex(str(item.get("offering_uuid", ""))) or ""
                self._by_offering.setdefault(offering_key, {})[key] = None
            self._touch()

    def remove_resource(self, uuid: str) -> None:
        key = _require_hex(uuid)
        with self._lock:
            old = self._resources.pop(key)
            self._by_offering.get(_hex(str(old.get("offering_uuid", ""))) or "", {}).pop(key, None)
            self._touch()

    def resource(self, uuid: str) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._resources[_require_hex(uuid)])

    def resource_uuids(self, offering_uuid: str | None = None) -> list[str]:
        with self._lock:
            if offering_uuid is None:
                return list(self._resources)
            return list(self._by_offering.get(_require_hex(offering_uuid), {}))

    def set_resource_state(self, uuid: str, state: str) -> None:
        self.update_resource(uuid, state=state)

    def update_resource(self, uuid: str, **changes: Any) -> dict[str, Any]:
        """Change fields of a stored resource (``modified`` is bumped)."""
        key = _require_hex(uuid)
        with self._lock:
            resource = self._resources[key]
            resource.update(copy.deepcopy(changes))
            resource["modified"] = now_iso()
            self._touch()
            return copy.deepcopy(resource)

    # -- state: orders --------------------------------------------------------------------------------------------

    def create_order(
        self,
        resource_uuid: str,
        type: str,
        *,
        limits: Mapping[str, Any] | None = None,
        attributes: Mapping[str, Any] | None = None,
        state: str = "pending-provider",
        uuid: str | None = None,
    ) -> dict[str, Any]:
        """An order for an existing resource, with Waldur's side effects (Create → resource ``Creating``;
        an executing Update / Terminate → ``Updating`` / ``Terminating``)."""
        if type not in ORDER_TYPES:
            raise ValueError(f"unknown order type {type!r}")
        if state not in ORDER_STATES:
            raise ValueError(f"unknown order state {state!r}")
        key = _require_hex(uuid) if uuid else self.new_uuid()
        with self._lock:
            resource = self._resources[_require_hex(resource_uuid)]
            order = make_order(
                resource,
                uuid=key,
                type=type,
                state=state,
                limits=limits,
                attributes=attributes,
                base_url=self.root,
            )
            self._orders[key] = order
            if type == "Create":
                resource["state"] = "Creating"
            if state == "executing":
                self._on_executing(order, resource)
            self._track_in_progress(order, resource)
            self._touch()
            return copy.deepcopy(order)

    def order_new_resource(
        self, offering_uuid: str, *, state: str = "pending-provider", **resource_fields: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """A new resource (``Creating``, no backend_id) with its Create order: ``(resource, order)``."""
        resource_fields.setdefault("backend_id", "")
        resource = self.add_resource(offering_uuid, state="Creating", **resource_fields)
        order = self.create_order(resource["uuid"], "Create", state=state)
        return self.resource(resource["uuid"]), order

    def order(self, uuid: str) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._orders[_require_hex(uuid)])

    def order_state(self, uuid: str) -> str:
        with self._lock:
            return str(self._orders[_require_hex(uuid)]["state"])

    def set_order_state(self, uuid: str, state: str) -> None:
        """Force an order state (no side effects, no checks)."""
        if state not in ORDER_STATES:
            raise ValueError(f"unknown order state {state!r}")
        with self._lock:
            order = self._orders[_require_hex(uuid)]
            order["state"] = state
            order["modified"] = now_iso()
            self._touch()

    def order_uuids(self) -> list[str]:
        with self._lock:
            return list(self._orders)

    # -- internal state helpers -----------------------------------------------------------------------------------

    def _touch(self) -> None:
        self._version += 1
        self._listing_cache.clear()

    def _resource_of(self, order: Mapping[str, Any]) -> dict[str, Any] | None:
        return self._resources.get(str(order.get("marketplace_resource_uuid", "")))

    def _track_in_progress(self, order: dict[str, Any], resource: dict[str, Any] | None) -> None:
        if resource is None:
            return
        if order["state"] in _TERMINAL_ORDER_STATES:
            current = resource.get("order_in_progress")
            if isinstance(current, dict) and current.get("uuid") == order["uuid"]:
                resource["order_in_progress"] = None
        else:
            resource["order_in_progress"] = copy.deepcopy(order)
        resource["modified"] = now_iso()

    @staticmethod
    def _on_executing(order: Mapping[str, Any], resource: dict[str, Any] | None) -> None:
        if resource is None:
            return
        if order["type"] == "Update":
            resource["state"] = "Updating"
        elif order["type"] == "Terminate":
            resource["state"] = "Terminating"

    # -- request handling -----------------------------------------------------------------------------------------

    def _handle(self, request: _Request) -> _Reply:
        reply = self._pick_fault(request.path)
        if reply is None or reply.fault == "slow":
            delay = reply.delay if reply is not None else 0.0
            fault = reply.fault if reply is not None else None
            try:
                reply = self._dispatch(request)
            except HttpError as exc:
                reply = _Reply(exc.status, exc.body, headers=exc.headers)
            except Exception as exc:  # an answer the fake could not build: Django's plain 500
                with self._lock:
                    self.server_errors.append(exc)
                reply = _Reply(500, b"<h1>Server Error (500)</h1>", content_type="text/html; charset=utf-8")
            reply.delay = delay
            reply.fault = fault
        body: Any = None
        if request.body:
            try:
                body = json.loads(request.body)
            except ValueError:
                body = request.body[:200].decode("utf-8", errors="replace")
        query: dict[str, list[str]] = {}
        for key, value in request.query:
            query.setdefault(key, []).append(value)
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            query=query,
            status=reply.status if reply.action == "answer" else None,
            fault=reply.fault,
            body=body,
        )
        with self._lock:
            self._requests.append(record)
        return reply

    def _dispatch(self, request: _Request) -> _Reply:
        route = self._match(request.path)
        if route is None:
            if not request.path.endswith("/") and self._match(request.path + "/") is not None:
                location = f"http://{request.host}{request.path}/"
                query = urlencode(request.query)
                return _Reply(
                    301,
                    b"",
                    headers={"Location": location + (f"?{query}" if query else "")},
                    content_type="text/html; charset=utf-8",
                )
            return _Reply(404, b"<h1>Not Found</h1>", content_type="text/html; charset=utf-8")
        handlers, params = route
        self._authenticate(request)
        allowed = sorted({*handlers, "OPTIONS", *(["HEAD"] if "GET" in handlers else [])})
        method = "GET" if request.method == "HEAD" and "GET" in handlers else request.method
        if method == "OPTIONS":
            return _Reply(200, {"name": "Fake Waldur", "renders": ["application/json"]}, {"Allow": ", ".join(allowed)})
        handler = handlers.get(method)
        if handler is None:
            raise HttpError(405, {"detail": f'Method "{request.method}" not allowed.'}, {"Allow": ", ".join(allowed)})
        return handler(request, params)

    def _authenticate(self, request: _Request) -> None:
        header = request.headers.get("authorization")
        challenge = {"WWW-Authenticate": "Token"}
        if not header:
            raise HttpError(401, {"detail": "Authentication credentials were not provided."}, challenge)
        parts = header.split()
        if len(parts) != 2 or parts[0] != "Token" or parts[1] != self.token:
            raise HttpError(401, {"detail": "Invalid token."}, challenge)

    def _match(self, path: str) -> tuple[dict[str, Handler], dict[str, str]] | None:
        for pattern, handlers in self._routes:
            found = pattern.fullmatch(path)
            if found:
                return handlers, found.groupdict()
        return None

    def _build_routes(self) -> list[tuple[re.Pattern[str], dict[str, Handler]]]:
        routes: list[tuple[str, dict[str, Handler]]] = [
            ("/api/marketplace-provider-resources/", {"GET": self._list_resources}),
            ("/api/marketplace-resources/", {"GET": self._list_resources}),
            (f"/api/marketplace-provider-resources/{_UUID_SEGMENT}/", {"GET": self._get_resource}),
            (f"/api/marketplace-resources/{_UUID_SEGMENT}/", {"GET": self._get_resource}),
            (
                f"/api/marketplace-provider-resources/{_UUID_SEGMENT}/set_backend_id/",
                {"POST": self._set_backend_id},
            ),
            ("/api/marketplace-orders/", {"GET": self._list_orders}),
            (f"/api/marketplace-orders/{_UUID_SEGMENT}/", {"GET": self._get_order}),
            (f"/api/marketplace-orders/{_UUID_SEGMENT}/approve_by_provider/", {"POST": self._approve}),
            (f"/api/marketplace-orders/{_UUID_SEGMENT}/reject_by_provider/", {"POST": self._reject}),
            (f"/api/marketplace-orders/{_UUID_SEGMENT}/set_state_executing/", {"POST": self._set_executing}),
            (f"/api/marketplace-orders/{_UUID_SEGMENT}/set_state_done/", {"POST": self._set_done}),
            (f"/api/marketplace-orders/{_UUID_SEGMENT}/set_state_erred/", {"POST": self._set_erred}),
            (f"/api/marketplace-provider-offerings/{_UUID_SEGMENT}/", {"GET": self._get_offering}),
            ("/api/users/me/", {"GET": self._users_me}),
        ]
        routes.extend(self._extra_routes())
        return [(_compile_path(path), handlers) for path, handlers in routes]

    def _extra_routes(self) -> list[tuple[str, dict[str, Handler]]]:
        identity = f"/api/marketplace-site-agent-identities/{_UUID_SEGMENT}/"
        subscription = f"/api/event-subscriptions/{_UUID_SEGMENT}/"
        return [
            (
                "/api/marketplace-site-agent-identities/",
                {"GET": self._list_identities, "POST": self._create_identity},
            ),
            (identity, {"GET": self._get_identity, "PUT": self._update_identity}),
            (identity + "register_event_subscription/", {"POST": self._register_event_subscription}),
            (identity + "register_queue/", {"POST": self._register_queue}),
            (identity + "register_service/", {"POST": self._register_service}),
            ("/api/event-subscriptions/", {"GET": self._list_subscriptions, "POST": self._create_subscription}),
            (subscription, {"GET": self._get_subscription, "DELETE": self._delete_subscription}),
            (subscription + "create_queue/", {"POST": self._create_queue}),
        ]

    # -- request helpers ------------------------------------------------------------------------------------------

    @staticmethod
    def _json_body(request: _Request) -> Any:
        if not request.body:
            return {}
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise HttpError(415, {"detail": f'Unsupported media type "{content_type}" in request.'})
        try:
            return json.loads(request.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HttpError(400, {"detail": f"JSON parse error - {exc}"}) from None

    @staticmethod
    def _object_body(request: _Request) -> dict[str, Any]:
        body = FakeWaldur._json_body(request)
        if not isinstance(body, dict):
            raise HttpError(
                400, {"non_field_errors": [f"Invalid data. Expected a dictionary, but got {type(body).__name__}."]}
            )
        return body

    @staticmethod
    def _uuid_filter(request: _Request, name: str) -> list[str]:
        values: list[str] = []
        for raw in request.values(name):
            if raw == "":
                continue
            value = _hex(raw)
            if value is None:
                raise HttpError(400, {name: ["Enter a valid UUID."]})
            values.append(value)
        return values

    @staticmethod
    def _choice_filter(request: _Request, name: str, choices: Iterable[str]) -> list[str]:
        allowed = set(choices)
        values = [value for value in request.values(name) if value != ""]
        for value in values:
            if value not in allowed:
                raise HttpError(400, {name: [f"Select a valid choice. {value} is not one of the available choices."]})
        return values

    def _lookup(self, table: Mapping[str, dict[str, Any]], params: Mapping[str, str]) -> dict[str, Any]:
        key = _hex(params["uuid"])
        if key is None or key not in table:
            raise _not_found()
        return table[key]

    @staticmethod
    def _select_fields(item: Mapping[str, Any], request: _Request) -> Any:
        wanted = [value for value in request.values("field") if value]
        if not wanted:
            return item
        return {key: value for key, value in item.items() if key in wanted}

    def _page(self, request: _Request, items: Sequence[Mapping[str, Any]]) -> _Reply:
        """DRF PageNumberPagination + Waldur's LinkHeaderPagination: bare array, X-Result-Count, Link."""
        page_size = self.default_page_size
        raw_size = request.last("page_size")
        if raw_size is not None:
            try:
                size = int(raw_size)
            except ValueError:
                size = 0
            if size > 0:
                page_size = min(size, self.max_page_size)
        total = len(items)
        pages = max(1, -(-total // page_size))
        raw_page = request.last("page") or "1"
        if raw_page == "last":
            number = pages
        else:
            try:
                number = int(raw_page)
            except ValueError:
                raise HttpError(404, {"detail": "Invalid page."}) from None
            if number < 1 or number > pages:
                raise HttpError(404, {"detail": "Invalid page."})
        chunk = items[(number - 1) * page_size : number * page_size]
        body = [self._select_fields(item, request) for item in chunk]
        headers: dict[str, str] = {}
        if not self.omit_result_count:
            headers["X-Result-Count"] = str(total + self.result_count_delta)
        if not self.omit_link:
            links = [("first", 1)]
            if number > 1:
                links.append(("prev", number - 1))
            if number < pages:
                links.append(("next", number + 1))
            links.append(("last", pages))
            headers["Link"] = ", ".join(f'<{self._page_url(request, page)}>; rel="{rel}"' for rel, page in links)
        return _Reply(200, body, headers=headers)

    @staticmethod
    def _page_url(request: _Request, page: int) -> str:
        grouped: dict[str, list[str]] = {}
        for key, value in request.query:
            if key != "page":
                grouped.setdefault(key, []).append(value)
        if page > 1:
            grouped["page"] = [str(page)]
        query = urlencode(sorted(grouped.items()), doseq=True)
        return f"http://{request.host}{request.path}" + (f"?{query}" if query else "")

    # -- endpoints: resources -------------------------------------------------------------------------------------

    def _list_resources(self, request: _Request, params: dict[str, str]) -> _Reply:
        offering_uuids = self._uuid_filter(request, "offering_uuid")
        states = self._choice_filter(request, "state", RESOURCE_STATES)
        project_uuids = self._uuid_filter(request, "project_uuid")
        backend_id = request.last("backend_id")
        offering_slugs = [value for value in request.values("offering_slug") if value]
        key = (
            tuple(offering_uuids),
            tuple(states),
            tuple(project_uuids),
            backend_id,
            tuple(offering_slugs),
        )
        with self._lock:
            uuids = self._listing_cache.get(key)
            if uuids is None:
                if offering_uuids:
                    candidates: Iterable[str] = [
                        uuid for offering in offering_uuids for uuid in self._by_offering.get(offering, {})
                    ]
                else:
                    candidates = self._resources
                uuids = []
                for uuid in candidates:
                    resource = self._resources[uuid]
                    if states and resource.get("state") not in states:
                        continue
                    if project_uuids and resource.get("project_uuid") not in project_uuids:
                        continue
                    if backend_id not in (None, "") and resource.get("backend_id") != backend_id:
                        continue
                    if offering_slugs and resource.get("offering_slug") not in offering_slugs:
                        continue
                    uuids.append(uuid)
                self._listing_cache[key] = uuids
            items = [self._resources[uuid] for uuid in uuids]
            reply = self._page(request, items)
            reply.body = _encode(reply.body)
            return reply

    def _get_resource(self, request: _Request, params: dict[str, str]) -> _Reply:
        with self._lock:
            resource = self._lookup(self._resources, params)
            return _Reply(200, _encode(self._select_fields(resource, request)))

    def _set_backend_id(self, request: _Request, params: dict[str, str]) -> _Reply:
        body = self._object_body(request)
        with self._lock:
            resource = self._lookup(self._resources, params)
            if "backend_id" not in body:
                raise HttpError(400, {"backend_id": ["This field is required."]})
            value = body["backend_id"]
            if value is None:
                raise HttpError(400, {"backend_id": ["This field may not be null."]})
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise HttpError(400, {"backend_id": ["Not a valid string."]})
            value = str(value)
            if resource.get("backend_id") == value:
                return _Reply(200, {"status": "Resource backend_id is not changed."})
            resource["backend_id"] = value
            resource["modified"] = now_iso()
            self._touch()
            return _Reply(200, {"status": "Resource backend_id has been changed."})

    # -- endpoints: orders ----------------------------------------------------------------------------------------

    def _list_orders(self, request: _Request, params: dict[str, str]) -> _Reply:
        offering = self._uuid_filter(request, "offering_uuid")
        resource = self._uuid_filter(request, "resource_uuid")
        states = self._choice_filter(request, "state", ORDER_STATES)
        types = self._choice_filter(request, "type", ORDER_TYPES)
        modified_before = request.last("modified_before")
        before: datetime | None = None
        if modified_before:
            try:
                before = datetime.fromisoformat(modified_before.replace("Z", "+00:00"))
            except ValueError:
                raise HttpError(400, {"modified_before": ["Enter a valid date/time."]}) from None
        with self._lock:
            items: list[dict[str, Any]] = []
            for order in self._orders.values():
                if offering and order.get("offering_uuid") != offering[-1]:
                    continue
                if resource and order.get("marketplace_resource_uuid") != resource[-1]:
                    continue
                if states and order.get("state") not in states:
                    continue
                if types and order.get("type") not in types:
                    continue
                if before is not None:
                    modified = datetime.fromisoformat(str(order["modified"]).replace("Z", "+00:00"))
                    if modified.tzinfo is None or before.tzinfo is None:
                        modified = modified.replace(tzinfo=None)
                        before = before.replace(tzinfo=None)
                    if modified >= before:
                        continue
                items.append(order)
            reply = self._page(request, items)
            reply.body = _encode(reply.body)
            return reply

    def _get_order(self, request: _Request, params: dict[str, str]) -> _Reply:
        with self._lock:
            order = self._lookup(self._orders, params)
            return _Reply(200, _encode(self._select_fields(order, request)))

    def _transition(
        self,
        request: _Request,
        params: dict[str, str],
        *,
        valid: Sequence[str] | None,
        target: str,
        body_required: bool = False,
    ) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]:
        body = self._object_body(request)
        order = self._lookup(self._orders, params)
        if valid is not None and order["state"] not in valid:
            raise _invalid_state(valid)
        order["state"] = target
        order["modified"] = now_iso()
        return order, self._resource_of(order), body

    def _approve(self, request: _Request, params: dict[str, str]) -> _Reply:
        with self._lock:
            order, resource, _ = self._transition(request, params, valid=["pending-provider"], target="executing")
            order["provider_reviewed_at"] = order["modified"]
            order["provider_reviewed_by"] = f"{self.root}/api/users/{self.user_uuid}/"
            order["provider_reviewed_by_username"] = self.username
            order["provider_reviewed_by_full_name"] = "Storage Agent"
            self._on_executing(order, resource)
            self._track_in_progress(order, resource)
            self._touch()
            return _Reply(200, {"detail": "Order has been approved."})

    def _reject(self, request: _Request, params: dict[str, str]) -> _Reply:
        with self._lock:
            order, resource, body = self._transition(request, params, valid=["pending-provider"], target="rejected")
            comment = body.get("provider_rejection_comment")
            if isinstance(comment, str):
                order["provider_rejection_comment"] = comment
            if resource is not None:
                resource["state"] = "Terminated" if order["type"] == "Create" else "OK"
            self._track_in_progress(order, resource)
            self._touch()
            return _Reply(200, {"detail": "Order has been rejected."})

    def _set_executing(self, request: _Request, params: dict[str, str]) -> _Reply:
        with self._lock:
            order, resource, _ = self._transition(
                request, params, valid=["pending-consumer", "pending-provider", "erred"], target="executing"
            )
            self._on_executing(order, resource)
            self._track_in_progress(order, resource)
            self._touch()
            return _Reply(200, b"", content_type="application/json")

    def _set_done(self, request: _Request, params: dict[str, str]) -> _Reply:
        with self._lock:
            order, resource, _ = self._transition(request, params, valid=["executing"], target="done")
            order["completed_at"] = order["modified"]
            if resource is not None:
                if order["type"] in ("Create", "Restore"):
                    resource["state"] = "OK"
                elif order["type"] == "Update":
                    resource["state"] = "OK"
                    resource["limits"] = copy.deepcopy(order.get("limits") or {})
                elif order["type"] == "Terminate":
                    resource["state"] = "Terminated"
            self._track_in_progress(order, resource)
            self._touch()
            return _Reply(200, b"", content_type="application/json")

    def _set_erred(self, request: _Request, params: dict[str, str]) -> _Reply:
        with self._lock:
            order, resource, body = self._transition(request, params, valid=None, target="erred")
            for key in ("error_message", "error_traceback"):
                value = body.get(key)
                if value is not None and not isinstance(value, str):
                    raise HttpError(400, {key: ["Not a valid string."]})
                if isinstance(value, str):
                    order[key] = value
            order["error_updated_at"] = order["modified"]
            if resource is not None:
                resource["state"] = "OK" if order["type"] == "Terminate" else "Erred"
            self._track_in_progress(order, resource)
            self._touch()
            return _Reply(200, b"", content_type="application/json")

    # -- endpoints: offerings, users ------------------------------------------------------------------------------

    def _get_offering(self, request: _Request, params: dict[str, str]) -> _Reply:
        with self._lock:
            offering = self._lookup(self._offerings, params)
            return _Reply(200, _encode(self._select_fields(offering, request)))

    def _users_me(self, request: _Request, params: dict[str, str]) -> _Reply:
        return _Reply(
            200,
            {
                "url": f"{self.root}/api/users/{self.user_uuid}/",
                "uuid": self.user_uuid,
                "username": self.username,
                "full_name": "Storage Agent",
                "email": "storage-agent@example.com",
                "civil_number": None,
                "token_lifetime": None,
                "token_expires_at": None,
                "registration_method": "default",
                "date_joined": "2024-11-05T10:00:00.000000Z",
                "agreement_date": None,
                "is_staff": False,
                "is_support": False,
                "is_active": True,
                "permissions": [],
                "affiliations": [],
                "identity_provider_fields": [],
                "active_isds": [],
                "attribute_sources": {},
            },
        )

    # -- registration: state helpers ------------------------------------------------------------------------------

    def identities(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(list(self._identities.values()))

    def subscriptions(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(list(self._subscriptions.values()))

    def subscription_queues(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(list(self._subscription_queues.values()))

    def consumers(self) -> list[dict[str, Any]]:
        """Unified queue registrations: ``{uuid, identity_uuid, offering_uuid, rmq_username, queue_name, vhost,
        observable_object_types}``."""
        with self._lock:
            return copy.deepcopy(list(self._consumers.values()))

    def message_targets(self, offering_uuid: str, object_type: str) -> list[MessageTarget]:
        """Where Mastermind would publish an ``object_type`` event of the offering (as ``prepare_messages`` does):
        the unified queues of identities of the offering that take the type; for a user without a unified queue,
        the legacy queues of (subscription, offering, type)."""
        offering = _require_hex(offering_uuid)
        targets: list[MessageTarget] = []
        with self._lock:
            unified_users: set[str] = set()
            for consumer in self._consumers.values():
                unified_users.add(consumer["vhost"])
                types = consumer["observable_object_types"]
                if consumer["offering_uuid"] == offering and (not types or object_type in types):
                    name = consumer["queue_name"]
                    targets.append(MessageTarget(vhost=consumer["vhost"], queue_name=name, topic=name))
            for row in self._subscription_queues.values():
                if row["offering_uuid"] != offering or row["object_type"] != object_type:
                    continue
                if row["vhost"] in unified_users:
                    continue
                sub = row["event_subscription_uuid"]
                targets.append(
                    MessageTarget(
                        vhost=row["vhost"],
                        queue_name=row["queue_name"],
                        topic=f"subscription/{sub}/offering/{offering}/{object_type}",
                    )
                )
        return targets

    def _user_url(self) -> str:
        return f"{self.root}/api/users/{self.user_uuid}/"

    def _object_type(self, body: Mapping[str, Any], key: str) -> str:
        if key not in body:
            raise HttpError(400, {key: ["This field is required."]})
        value = body[key]
        if not isinstance(value, str) or value not in OBSERVABLE_OBJECT_TYPES:
            raise HttpError(400, {key: [f'"{value}" is not a valid choice.']})
        return value

    def _provision_user_vhost(self, rmq_username: str) -> None:
        if self.rabbit is None:
            return
        self.rabbit.ensure_vhost(self.user_uuid)
        self.rabbit.ensure_user(rmq_username, self.token)
        self.rabbit.grant(self.user_uuid, rmq_username)
        self.rabbit.grant(self.user_uuid, self.rabbit.admin_user)

    # -- endpoints: agent identities ------------------------------------------------------------------------------

    def _identity_fields(self, body: Mapping[str, Any]) -> dict[str, Any]:
        errors: dict[str, list[str]] = {}
        offering = body.get("offering")
        offering_hex = _hex(offering) if isinstance(offering, str) else None
        if offering is None:
            errors["offering"] = ["This field is required."]
        elif offering_hex is None or offering_hex not in self._offerings:
            errors["offering"] = [f"Object with uuid={offering} does not exist."]
        name = body.get("name")
        if name is None:
            errors["name"] = ["This field is required."]
        elif not isinstance(name, str) or not name:
            errors["name"] = ["This field may not be blank."]
        dependencies = body.get("dependencies", [])
        if not isinstance(dependencies, list) or not all(
            isinstance(d, dict) and isinstance(d.get("package"), str) and isinstance(d.get("version"), str)
            for d in dependencies
        ):
            errors["dependencies"] = ["Invalid dependencies."]
        last_restarted = body.get("last_restarted")
        if last_restarted is not None:
            try:
                datetime.fromisoformat(str(last_restarted).replace("Z", "+00:00"))
            except ValueError:
                errors["last_restarted"] = ["Datetime has wrong format."]
        if errors:
            raise HttpError(400, errors)
        return {
            "offering": offering_hex,
            "name": name,
            "version": body.get("version"),
            "dependencies": dependencies,
            "last_restarted": last_restarted,
            "config_file_path": body.get("config_file_path") or "",
            "config_file_content": body.get("config_file_content") or "",
        }

    def _list_identities(self, request: _Request, params: dict[str, str]) -> _Reply:
        offerings = self._uuid_filter(request, "offering_uuid")
        name = request.last("name")
        with self._lock:
            items = [
                identity
                for identity in self._identities.values()
                if (not name or identity["name"] == name) and (not offerings or identity["offering"] in offerings)
            ]
            reply = self._page(request, items)
            reply.body = _encode(reply.body)
            return reply

    def _create_identity(self, request: _Request, params: dict[str, str]) -> _Reply:
        body = self._object_body(request)
        with self._lock:
            values = self._identity_fields(body)
            for identity in self._identities.values():
                if identity["offering"] == values["offering"] and identity["name"] == values["name"]:
                    raise HttpError(400, {"non_field_errors": ["The fields offering, name must make a unique set."]})
            key = self.new_uuid()
            now = now_iso()
            identity = {
                "uuid": key,
                "url": f"{self.root}/api/marketplace-site-agent-identities/{key}/",
                **values,
                "created_by": self.user_uuid,
                "created": now,
                "modified": now,
                "services": [],
                "compatibility": {"status": "compatible", "message": "Agent version is compatible"},
            }
            if identity["last_restarted"] is None:
                del identity["last_restarted"]
            self._identities[key] = identity
            return _Reply(201, _encode(identity))

    def _get_identity(self, request: _Request, params: dict[str, str]) -> _Reply:
        with self._lock:
            return _Reply(200, _encode(self._lookup(self._identities, params)))

    def _update_identity(self, request: _Request, params: dict[str, str]) -> _Reply:
        body = self._object_body(request)
        with self._lock:
            identity = self._lookup(self._identities, params)
            values = self._identity_fields(body)
            identity.update({k: v for k, v in values.items() if v is not None})
            identity["modified"] = now_iso()
            return _Reply(200, _encode(identity))

    def _register_service(self, request: _Request, params: dict[str, str]) -> _Reply:
        body = self._object_body(request)
        with self._lock:
            identity = self._lookup(self._identities, params)
            name = body.get("name")
            if not isinstance(name, str) or not name:
                raise HttpError(400, {"name": ["This field is required."]})
            now = now_iso()
            for service in self._services.values():
                if service["identity"] == identity["uuid"] and service["name"] == name:
                    service["modified"] = now
                    service["state"] = "Active"
                    return _Reply(200, _encode(service))
            key = self.new_uuid()
            service = {
                "uuid": key,
                "url": f"{self.root}/api/marketplace-site-agent-services/{key}/",
                "identity": identity["uuid"],
                "identity_name": identity["name"],
                "name": name,
                "mode": body.get("mode") or "",
                "state": "Active",
                "statistics": {},
                "created": now,
                "modified": now,
                "processors": [],
            }
            self._services[key] = service
            identity["services"].append(
                {k: service[k] for k in ("uuid", "url", "name", "mode", "state", "statistics", "created", "modified")}
            )
            return _Reply(201, _encode(service))

    def _register_queue(self, request: _Request, params: dict[str, str]) -> _Reply:
        body = self._object_body(request)
        with self._lock:
            identity = self._lookup(self._identities, params)
            types: list[str] | None = None
            if "object_types" in body:
                raw_types = body["object_types"]
                if not isinstance(raw_types, list):
                    raise HttpError(400, {"object_types": ['Expected a list of items but got type "str".']})
                for value in raw_types:
                    if not isinstance(value, str) or value not in OBSERVABLE_OBJECT_TYPES:
                        raise HttpError(400, {"object_types": {"0": [f'"{value}" is not a valid choice.']}})
                types = list(dict.fromkeys(raw_types))
            consumer = self._consumers.get(identity["uuid"])
            status = 200
            if consumer is None:
                status = 201
                key = uuid_mod.uuid4().hex
                consumer = {
                    "uuid": key,
                    "identity_uuid": identity["uuid"],
                    "offering_uuid": identity["offering"],
                    "rmq_username": uuid_mod.uuid4().hex,
                    "queue_name": f"consumer_{key}",
                    "vhost": self.user_uuid,
                    "observable_object_types": types if types is not None else [],
                }
                self._consumers[identity["uuid"]] = consumer
            elif types is not None:
                consumer["observable_object_types"] = types
            # The password is (re)set to the caller's token on every registration.
            self._provision_user_vhost(consumer["rmq_username"])
            if self.rabbit is not None:
                self.rabbit.ensure_queue(consumer["vhost"], consumer["queue_name"])
            answer = {k: consumer[k] for k in ("rmq_username", "queue_name", "vhost", "observable_object_types")}
            return _Reply(status, answer)

    # -- endpoints: event subscriptions ---------------------------------------------------------------------------

    def _new_subscription(self, description: str, observable_objects: list[dict[str, Any]]) -> dict[str, Any]:
        key = uuid_mod.uuid4().hex
        now = now_iso()
        subscription = {
            "uuid": key,
            "url": f"{self.root}/api/event-subscriptions/{key}/",
            "description": description,
            "user": self._user_url(),
            "user_uuid": self.user_uuid,
            "user_username": self.username,
            "user_full_name": "Storage Agent",
            "created": now,
            "modified": now,
            "observable_objects": observable_objects,
            "source_ip": "127.0.0.1",
        }
        self._provision_user_vhost(key)
        self._subscriptions[key] = subscription
        return subscription

    def _drop_subscription(self, key: str) -> None:
        self._subscriptions.pop(key, None)
        for row_key, row in list(self._subscription_queues.items()):
            if row["event_subscription_uuid"] == key:
                del self._subscription_queues[row_key]
                if self.rabbit is not None:
                    self.rabbit.delete_queue(row["vhost"], row["queue_name"])
        if self.rabbit is not None:
            self.rabbit.delete_user(key)

    def _register_event_subscription(self, request: _Request, params: dict[str, str]) -> _Reply:
        body = self._object_body(request)
        with self._lock:
            identity = self._lookup(self._identities, params)
            object_type = self._object_type(body, "observable_object_type")
            wanted = [{"object_type": object_type}]
            for key, subscription in list(self._subscriptions.items()):
                if subscription["observable_objects"] == wanted:
                    if self.rabbit is None or self.rabbit.user_exists(key):
                        return _Reply(200, _encode(subscription))
                    # Its RabbitMQ user is gone: Waldur deletes the subscription and makes a new one.
                    self._drop_subscription(key)
                    break
            description = body.get("description")
            if not isinstance(description, str):
                description = f"Event subscription for {identity['name']}, observable object type: {object_type}"
            subscription = self._new_subscription(description, wanted)
            return _Reply(201, _encode(subscription))

    def _create_subscription(self, request: _Request, params: dict[str, str]) -> _Reply:
        body = self._object_body(request)
        with self._lock:
            objects = body.get("observable_objects", [])
            if not isinstance(objects, list) or not all(isinstance(o, dict) for o in objects):
                raise HttpError(400, {"observable_objects": ["Invalid observable objects."]})
            cleaned: list[dict[str, Any]] = []
            for item in objects:
                entry: dict[str, Any] = {"object_type": self._object_type(item, "object_type")}
                if item.get("offering_uuid"):
                    offering = _hex(str(item["offering_uuid"]))
                    if offering is None:
                        raise HttpError(400, {"observable_objects": [{"offering_uuid": ["Must be a valid UUID."]}]})
                    entry["offering_uuid"] = offering
                cleaned.append(entry)
            description = body.get("description")
            subscription = self._new_subscription(description if isinstance(description, str) else "", cleaned)
            return _Reply(201, _encode(subscription))

    def _list_subscriptions(self, request: _Request, params: dict[str, str]) -> _Reply:
        with self._lock:
            reply = self._page(request, list(self._subscriptions.values()))
            reply.body = _encode(reply.body)
            return reply

    def _get_subscription(self, request: _Request, params: dict[str, str]) -> _Reply:
        with self._lock:
            return _Reply(200, _encode(self._lookup(self._subscriptions, params)))

    def _delete_subscription(self, request: _Request, params: dict[str, str]) -> _Reply:
        with self._lock:
            subscription = self._lookup(self._subscriptions, params)
            self._drop_subscription(subscription["uuid"])
            if self.rabbit is not None and not self._subscriptions and not self._consumers:
                self.rabbit.delete_vhost(self.user_uuid)
            return _Reply(204)

    def _create_queue(self, request: _Request, params: dict[str, str]) -> _Reply:
        body = self._object_body(request)
        with self._lock:
            subscription = self._lookup(self._subscriptions, params)
            errors: dict[str, list[str]] = {}
            raw_offering = body.get("offering_uuid")
            offering = _hex(raw_offering) if isinstance(raw_offering, str) else None
            if raw_offering is None:
                errors["offering_uuid"] = ["This field is required."]
            elif offering is None:
                errors["offering_uuid"] = ["Must be a valid UUID."]
            if errors:
                raise HttpError(400, errors)
            object_type = self._object_type(body, "object_type")
            if offering not in self._offerings:
                raise HttpError(400, {"offering_uuid": ["Offering not found or not accessible."]})
            assert offering is not None
            sub_key = subscription["uuid"]
            queue_name = f"subscription_{sub_key}_offering_{offering}_{object_type}"
            row = next((r for r in self._subscription_queues.values() if r["queue_name"] == queue_name), None)
            status = 200
            if row is None:
                status = 201
                key = self.new_uuid()
                row = {
                    "uuid": key,
                    "url": f"{self.root}/api/event-subscription-queues/{key}/",
                    "event_subscription": subscription["url"],
                    "event_subscription_uuid": sub_key,
                    "offering_uuid": offering,
                    "object_type": object_type,
                    "queue_name": queue_name,
                    "vhost": subscription["user_uuid"],
                    "created": now_iso(),
                }
                self._subscription_queues[key] = row
            if self.rabbit is not None:
                self.rabbit.ensure_queue(row["vhost"], queue_name)
            return _Reply(status, _encode(row))


@dataclass(frozen=True)
class MessageTarget:
    """One place Mastermind publishes an event to: STOMP ``/amq/queue/<queue_name>`` in ``vhost``."""

    vhost: str
    queue_name: str
    topic: str  # Mastermind's internal topic (the MQTT topic of the legacy path)

    @property
    def destination(self) -> str:
        return f"/amq/queue/{self.queue_name}"


class RabbitProvisioner:
    """Creates vhosts, users, permissions and queues through RabbitMQ's management HTTP API, as Mastermind does,
    and remembers them so a test can clean up."""

    def __init__(self, api: str, admin_user: str, admin_password: str, *, timeout: float = 10.0) -> None:
        self.api = api.rstrip("/")
        self.admin_user = admin_user
        self._http = httpx.Client(base_url=f"{self.api}/api", auth=(admin_user, admin_password), timeout=timeout)
        self.vhosts: set[str] = set()
        self.users: set[str] = set()

    def close(self) -> None:
        self._http.close()

    @staticmethod
    def _q(value: str) -> str:
        return quote(value, safe="")

    def _call(self, method: str, path: str, body: Any = None, *, missing_ok: bool = False) -> httpx.Response:
        response = self._http.request(method, path, json=body)
        if response.status_code == 404 and missing_ok:
            return response
        if response.status_code >= 300:
            raise RuntimeError(
                f"RabbitMQ management {method} {path}: HTTP {response.status_code} {response.text[:200]}"
            )
        return response

    def ensure_vhost(self, vhost: str) -> None:
        self._call("PUT", f"/vhosts/{self._q(vhost)}")
        self.vhosts.add(vhost)

    def ensure_user(self, name: str, password: str) -> None:
        self._call("PUT", f"/users/{self._q(name)}", {"password": password, "tags": ""})
        self.users.add(name)

    def grant(self, vhost: str, user: str) -> None:
        self._call(
            "PUT",
            f"/permissions/{self._q(vhost)}/{self._q(user)}",
            {"configure": ".*", "write": ".*", "read": ".*"},
        )

    def ensure_queue(self, vhost: str, queue: str) -> None:
        self._call(
            "PUT",
            f"/queues/{self._q(vhost)}/{self._q(queue)}",
            {"durable": True, "auto_delete": False, "arguments": dict(QUEUE_ARGUMENTS)},
        )

    def user_exists(self, name: str) -> bool:
        return self._call("GET", f"/users/{self._q(name)}", missing_ok=True).status_code == 200

    def delete_user(self, name: str) -> None:
        self._call("DELETE", f"/users/{self._q(name)}", missing_ok=True)
        self.users.discard(name)

    def delete_queue(self, vhost: str, queue: str) -> None:
        self._call("DELETE", f"/queues/{self._q(vhost)}/{self._q(queue)}", missing_ok=True)

    def delete_vhost(self, vhost: str) -> None:
        self._call("DELETE", f"/vhosts/{self._q(vhost)}", missing_ok=True)
        self.vhosts.discard(vhost)

    def get_queue(self, vhost: str, queue: str) -> dict[str, Any] | None:
        response = self._call("GET", f"/queues/{self._q(vhost)}/{self._q(queue)}", missing_ok=True)
        return None if response.status_code == 404 else dict(response.json())

    def cleanup(self) -> None:
        """Delete every user and vhost this provisioner created (queues go with their vhost)."""
        for user in list(self.users):
            try:
                self.delete_user(user)
            except (httpx.HTTPError, RuntimeError):
                pass
        for vhost in list(self.vhosts):
            try:
                self.delete_vhost(vhost)
            except (httpx.HTTPError, RuntimeError):
                pass


def _encode(body: Any) -> bytes:
    """Serialise while the state lock is held (the stored dicts may change right after)."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _compile_path(path: str) -> re.Pattern[str]:
    head, found, tail = path.partition(_UUID_SEGMENT)
    if not found:
        return re.compile(re.escape(path))
    return re.compile(re.escape(head) + _UUID_SEGMENT + re.escape(tail))


__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "OBSERVABLE_OBJECT_TYPES",
    "QUEUE_ARGUMENTS",
    "FakeWaldur",
    "Faults",
    "HttpError",
    "MessageTarget",
    "RabbitProvisioner",
    "RecordedRequest",
]
