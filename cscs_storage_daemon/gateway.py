"""The only module that talks HTTP to Waldur.

Requests are built with waldur-api-client's request builders (``_get_kwargs``: method, path, query, JSON body) and
handed to a `WaldurTransport` (waldur_transport.py): over HTTP by default (`HttpxTransport` on an
`httpx.HTTPTransport`; the capture and the tests pass their own httpx transport, `httpx.MockTransport` included),
or answered from a capture by the replay. Answers are read as plain JSON: a resource is never rejected because a
generated model cannot parse one of its values.

Every call goes through the retry policy of `retry.py`; only transient failures (transport errors, timeouts, 429,
5xx) are retried. The first attempt runs without the retry machinery; only a transient failure builds it.

Errors:

* `WaldurUnavailable`: still transient after the retry policy gave up;
* `WaldurRejected`: a 4xx other than 429, raised at once (status and the body's ``detail`` in the message);
* `WaldurPaginationError`: a listing that does not add up to its ``X-Result-Count``;
* `WaldurError`: the base class, also used for answers that make no sense (an unexpected status, bad JSON).

The token never appears in a message, a log line or an exception.
"""

from __future__ import annotations

import json
import re
import time
import uuid as uuid_mod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import httpx
import orjson
import structlog
from waldur_api_client.api.event_subscriptions import (
    event_subscriptions_create_queue,
    event_subscriptions_destroy,
)
from waldur_api_client.api.marketplace_orders import (
    marketplace_orders_approve_by_provider,
    marketplace_orders_list,
    marketplace_orders_retrieve,
    marketplace_orders_set_state_done,
    marketplace_orders_set_state_erred,
)
from waldur_api_client.api.marketplace_provider_offerings import marketplace_provider_offerings_retrieve
from waldur_api_client.api.marketplace_provider_resources import (
    marketplace_provider_resources_list,
    marketplace_provider_resources_retrieve,
    marketplace_provider_resources_set_backend_id,
)
from waldur_api_client.api.marketplace_site_agent_identities import (
    marketplace_site_agent_identities_create,
    marketplace_site_agent_identities_list,
    marketplace_site_agent_identities_register_event_subscription,
    marketplace_site_agent_identities_register_queue,
    marketplace_site_agent_identities_update,
)
from waldur_api_client.api.users import users_me_retrieve
from waldur_api_client.models.agent_dependency_request import AgentDependencyRequest
from waldur_api_client.models.agent_event_subscription_create_request import AgentEventSubscriptionCreateRequest
from waldur_api_client.models.agent_identity import AgentIdentity
from waldur_api_client.models.agent_identity_request import AgentIdentityRequest
from waldur_api_client.models.agent_queue_registration_request import AgentQueueRegistrationRequest
from waldur_api_client.models.agent_queue_registration_response import AgentQueueRegistrationResponse
from waldur_api_client.models.event_subscription import EventSubscription
from waldur_api_client.models.event_subscription_queue import EventSubscriptionQueue
from waldur_api_client.models.event_subscription_queue_create_request import EventSubscriptionQueueCreateRequest
from waldur_api_client.models.observable_object_type_enum import ObservableObjectTypeEnum
from waldur_api_client.models.order_approve_by_provider_request import OrderApproveByProviderRequest
from waldur_api_client.models.order_error_details_request import OrderErrorDetailsRequest
from waldur_api_client.models.order_state import OrderState
from waldur_api_client.models.resource_backend_id_request import ResourceBackendIDRequest

from cscs_storage_daemon import __version__
from cscs_storage_daemon.retry import (
    OnRetry,
    RetryPolicy,
    TransientHTTPStatus,
    build_retrying,
    describe,
    is_transient,
    is_transient_status,
    parse_retry_after,
)
from cscs_storage_daemon.waldur_transport import Answer, HttpxTransport, WaldurTransport

log = structlog.get_logger(__name__)

DETAIL_LIMIT = 300
DEFAULT_PAGE_SIZE = 100
LISTING_RESTARTS = 2


class WaldurError(Exception):
    """Any failure of a Waldur call. ``status`` is the HTTP status, or None when no answer arrived."""

    def __init__(self, message: str, *, method: str, path: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.method = method
        self.path = path
        self.status = status


class WaldurUnavailable(WaldurError):
    """Waldur could not be reached, or kept answering 429/5xx, until the retry policy gave up."""


class WaldurRejected(WaldurError):
    """Waldur refused the request (4xx other than 429); trying again will not help."""

    def __init__(self, message: str, *, method: str, path: str, status: int, detail: str) -> None:
        super().__init__(message, method=method, path=path, status=status)
        self.detail = detail


class WaldurPaginationError(WaldurError):
    """A listing did not add up: missing pages, a missing or lying ``X-Result-Count``, a broken ``Link``."""


class _ListingChanged(Exception):
    """The collection changed while it was being paged through; start over."""


class ListingSink(Protocol):
    """Where a listing's items go, a page at a time (the mirror's `MirrorListing`, or `CollectedListing`)."""

    def take(self, items: list[dict[str, Any]]) -> None:
        """One page's items, in order (each a JSON object, uuids not repeated within the listing)."""
        ...

    def restart(self) -> None:
        """Forget every item taken: the listing starts over (the collection changed under it)."""
        ...


class CollectedListing:
    """A `ListingSink` that keeps every item in a list."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def take(self, items: list[dict[str, Any]]) -> None:
        self.items.extend(items)

    def restart(self) -> None:
        self.items = []


def api_root(api_url: str) -> str:
    """The server root the client wants: ``https://h/api/`` and ``https://h`` both give ``https://h``."""
    url = api_url.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("Waldur API URL must be an absolute http(s) URL")
    if parts.query or parts.fragment:
        raise ValueError("Waldur API URL must not carry a query or a fragment")
    url = url.rstrip("/")
    return url.removesuffix("/api")


#: What a waldur-api-client ``_get_kwargs`` may return for the endpoints used here.
_BUILDER_KEYS = frozenset({"method", "url", "params", "json", "content", "headers"})


def _loads(content: bytes) -> Any:
    """JSON from a response body: orjson, or the standard library for what orjson refuses but JSON allows
    (integers beyond 64 bits); ValueError when it is not JSON at all."""
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return json.loads(content)


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer with the request it answers (for messages: the method and the path without its query)."""

    method: str
    path: str
    answer: Answer

    @property
    def status(self) -> int:
        return self.answer.status


_LINK = re.compile(r"<([^>]*)>([^<]*)")
_HEX32 = re.compile(r"[0-9a-f]{32}")


def next_link(header: str) -> str | None:
    """The URL of ``rel="next"`` in a ``Link`` header (RFC 8288), or None."""
    for match in _LINK.finditer(header):
        for param in match.group(2).split(";"):
            name, _, value = param.strip().rstrip(",").partition("=")
            if name.strip().lower() == "rel" and "next" in value.strip().strip("\"'").lower().split():
                return match.group(1).strip()
    return None


def _client_version() -> str:
    try:
        from importlib.metadata import version

        return version("waldur-api-client")
    except Exception:
        return "unknown"


def uuid_hex(value: str | uuid_mod.UUID) -> str:
    """32 lowercase hex digits, from a dashed or plain uuid; ValueError for anything else."""
    if isinstance(value, uuid_mod.UUID):
        return value.hex
    if type(value) is str and _HEX32.fullmatch(value):
        return value  # already the canonical form (most calls)
    return uuid_mod.UUID(str(value).strip()).hex


class WaldurGateway:
    """Synchronous Waldur REST access for the storage daemon (thread-safe: one shared httpx client)."""

    def __init__(
        self,
        api_url: str,
        token: str,
        *,
        verify_ssl: bool = True,
        timeout: float = 10.0,
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen dataclass, immutable default
        transport: httpx.BaseTransport | WaldurTransport | None = None,
        on_retry: OnRetry | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> None:
        if not token:
            raise ValueError("Waldur API token must not be empty")
        if page_size < 1:
            raise ValueError("page_size must be positive")
        self._root = api_root(api_url)
        self._token = token
        self._retry = retry
        self._on_retry = on_retry
        self._page_size = page_size
        # The transport is ours to close; verify_ssl only matters for the default one.
        if transport is None or isinstance(transport, httpx.BaseTransport):
            headers = {
                "Accept": "application/json",
                "Accept-Encoding": "gzip, deflate",
                "Authorization": f"Token {token}",
                "User-Agent": f"cscs-storage-daemon/{__version__}",
            }
            inner = transport if transport is not None else httpx.HTTPTransport(verify=verify_ssl)
            transport = HttpxTransport(self._root, headers, timeout=timeout, transport=inner)
        self._transport: WaldurTransport = transport

    # -- lifecycle -----------------------------------------------------------------------------------------------

    @property
    def root(self) -> str:
        return self._root

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> WaldurGateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"WaldurGateway({self._root!r})"

    # -- resources ------------------------------------------------------------------------------------------------

    def list_resources(self, offering_uuid: str | uuid_mod.UUID) -> list[dict[str, Any]]:
        """Every resource of the offering (all pages, checked against ``X-Result-Count``)."""
        collected = CollectedListing()
        self.read_resources(offering_uuid, collected)
        return collected.items

    def read_resources(self, offering_uuid: str | uuid_mod.UUID, into: ListingSink) -> int:
        """Every resource of the offering, handed to `into` a page at a time as each page arrives, so no more than
        one page's JSON is held here. Returns how many (checked against ``X-Result-Count``); when it raises, what
        `into` took is incomplete."""
        kwargs = marketplace_provider_resources_list._get_kwargs(offering_uuid=[uuid_hex(offering_uuid)])
        return self._list_all("list_resources", kwargs, into)

    def get_resource(self, resource_uuid: str | uuid_mod.UUID) -> dict[str, Any]:
        kwargs = marketplace_provider_resources_retrieve._get_kwargs(uuid_hex(resource_uuid))
        return self._json_object(self._send("get_resource", kwargs))

    def set_backend_id(self, resource_uuid: str | uuid_mod.UUID, backend_id: str) -> None:
        body = ResourceBackendIDRequest(backend_id=backend_id)
        kwargs = marketplace_provider_resources_set_backend_id._get_kwargs(uuid_hex(resource_uuid), body=body)
        self._send("set_backend_id", kwargs)

    # -- orders ---------------------------------------------------------------------------------------------------

    def get_order(self, order_uuid: str | uuid_mod.UUID) -> dict[str, Any]:
        kwargs = marketplace_orders_retrieve._get_kwargs(uuid_hex(order_uuid))
        return self._json_object(self._send("get_order", kwargs))

    def list_orders(self, offering_uuid: str | uuid_mod.UUID, states: Sequence[str]) -> list[dict[str, Any]]:
        """Every order of the offering in one of ``states`` (all pages)."""
        if isinstance(states, str):
            raise TypeError("states must be a sequence of state names, not a string")
        kwargs = marketplace_orders_list._get_kwargs(
            offering_uuid=uuid_hex(offering_uuid),
            state=[OrderState(state) for state in states],
        )
        return self._list_collected("list_orders", kwargs)

    def approve_order(self, order_uuid: str | uuid_mod.UUID) -> None:
        """pending-provider → executing. Any other state: `WaldurRejected` with status 409."""
        kwargs = marketplace_orders_approve_by_provider._get_kwargs(
            uuid_hex(order_uuid), body=OrderApproveByProviderRequest()
        )
        self._send("approve_order", kwargs)

    def set_order_done(self, order_uuid: str | uuid_mod.UUID) -> None:
        """executing → done. Any other state: `WaldurRejected` with status 409."""
        kwargs = marketplace_orders_set_state_done._get_kwargs(uuid_hex(order_uuid))
        self._send("set_order_done", kwargs)

    def set_order_erred(self, order_uuid: str | uuid_mod.UUID, message: str, traceback: str | None = None) -> None:
        body = OrderErrorDetailsRequest(error_message=message)
        if traceback is not None:
            body.error_traceback = traceback
        kwargs = marketplace_orders_set_state_erred._get_kwargs(uuid_hex(order_uuid), body=body)
        self._send("set_order_erred", kwargs)

    # -- offerings ------------------------------------------------------------------------------------------------

    def get_offering(self, offering_uuid: str | uuid_mod.UUID) -> dict[str, Any]:
        """The provider offering; its ``slug`` is the storage system name."""
        kwargs = marketplace_provider_offerings_retrieve._get_kwargs(uuid_hex(offering_uuid))
        return self._json_object(self._send("get_offering", kwargs))

    # -- registration (agent identity, event subscriptions, queues) ---------------------------------------------

    @property
    def token(self) -> str:
        """The API token; also the broker password Waldur gives the agent's RabbitMQ user. Never log it."""
        return self._token

    def get_current_user(self) -> dict[str, Any]:
        """``GET /api/users/me/``: the token's owner (its ``uuid`` hex is the legacy vhost)."""
        kwargs = users_me_retrieve._get_kwargs()
        return self._json_object(self._send("get_current_user", kwargs))

    def find_agent_identity(self, offering_uuid: str | uuid_mod.UUID, name: str) -> dict[str, Any] | None:
        """The agent identity called ``name`` for the offering, or None."""
        offering = uuid_hex(offering_uuid)
        kwargs = marketplace_site_agent_identities_list._get_kwargs(name=name)
        for identity in self._list_collected("find_agent_identity", kwargs):
            if identity.get("name") != name:
                continue
            try:
                if uuid_hex(str(identity.get("offering", ""))) != offering:
                    continue
            except ValueError:
                continue
            return identity
        return None

    def ensure_agent_identity(
        self,
        offering_uuid: str | uuid_mod.UUID,
        *,
        name: str | None = None,
        version: str = __version__,
        dependencies: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Find the agent identity ``agent-<offering hex>`` and update it, or create it (as the site agent does)."""
        offering = uuid_hex(offering_uuid)
        name = name or f"agent-{offering}"
        deps = dependencies if dependencies is not None else {"waldur-api-client": _client_version()}
        body = AgentIdentityRequest(
            offering=offering,
            name=name,
            version=version,
            dependencies=[AgentDependencyRequest(package=p, version=v) for p, v in deps.items()],
            config_file_path="",
            config_file_content="",
            last_restarted=datetime.now(UTC),
        )
        existing = self.find_agent_identity(offering, name)
        if existing is not None:
            kwargs = marketplace_site_agent_identities_update._get_kwargs(uuid_hex(str(existing["uuid"])), body=body)
            reply = self._send("update_agent_identity", kwargs)
        else:
            kwargs = marketplace_site_agent_identities_create._get_kwargs(body=body)
            reply = self._send("create_agent_identity", kwargs, ok=(201,))
        return self._validated(reply, AgentIdentity)

    def register_queue(self, identity_uuid: str | uuid_mod.UUID, object_types: Sequence[str] | None) -> dict[str, Any]:
        """Unified registration: ``{rmq_username, queue_name, vhost, observable_object_types}``.

        ``object_types=None`` keeps the server's current filter; ``[]`` means every type.
        """
        body = AgentQueueRegistrationRequest()
        if object_types is not None:
            if isinstance(object_types, str):
                raise TypeError("object_types must be a sequence of type names, not a string")
            body.object_types = [ObservableObjectTypeEnum(t) for t in object_types]
        kwargs = marketplace_site_agent_identities_register_queue._get_kwargs(uuid_hex(identity_uuid), body=body)
        return self._validated(self._send("register_queue", kwargs, ok=(200, 201)), AgentQueueRegistrationResponse)

    def register_event_subscription(
        self, identity_uuid: str | uuid_mod.UUID, object_type: str, description: str | None = None
    ) -> dict[str, Any]:
        """Legacy registration, step 1: the `EventSubscription` of this user for ``object_type``."""
        body = AgentEventSubscriptionCreateRequest(observable_object_type=ObservableObjectTypeEnum(object_type))
        if description is not None:
            body.description = description
        kwargs = marketplace_site_agent_identities_register_event_subscription._get_kwargs(
            uuid_hex(identity_uuid), body=body
        )
        return self._validated(self._send("register_event_subscription", kwargs, ok=(200, 201)), EventSubscription)

    def create_queue(
        self, subscription_uuid: str | uuid_mod.UUID, offering_uuid: str | uuid_mod.UUID, object_type: str
    ) -> dict[str, Any]:
        """Legacy registration, step 2: the queue of (subscription, offering, object type)."""
        body = EventSubscriptionQueueCreateRequest(
            offering_uuid=uuid_hex(offering_uuid), object_type=ObservableObjectTypeEnum(object_type)
        )
        kwargs = event_subscriptions_create_queue._get_kwargs(uuid_hex(subscription_uuid), body=body)
        return self._validated(self._send("create_queue", kwargs, ok=(200, 201)), EventSubscriptionQueue)

    def delete_event_subscription(self, subscription_uuid: str | uuid_mod.UUID) -> None:
        """Delete a legacy subscription (Waldur then deletes its RabbitMQ user and queues)."""
        kwargs = event_subscriptions_destroy._get_kwargs(uuid_hex(subscription_uuid))
        self._send("delete_event_subscription", kwargs, ok=(204,))

    # -- plumbing -------------------------------------------------------------------------------------------------

    def _validated(self, reply: Reply, model: Any) -> dict[str, Any]:
        """The JSON object, after checking that the client's model accepts it (required keys, types)."""
        body = self._json_object(reply)
        try:
            model.from_dict(body)
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise WaldurError(
                f"Waldur answered {reply.method} {reply.path} with a body {model.__name__} cannot read "
                f"({type(exc).__name__}: {str(exc)[:100]})",
                method=reply.method,
                path=reply.path,
                status=reply.status,
            ) from None
        return body

    def _send(
        self,
        operation: str,
        kwargs: Mapping[str, Any],
        *,
        ok: Iterable[int] = (200,),
    ) -> Reply:
        """Send one request with the retry policy; return the answer when its status is in ``ok``."""
        method = str(kwargs["method"]).upper()
        path = str(kwargs["url"])
        accepted = frozenset(ok)
        started = time.monotonic()
        try:
            return self._once(method, path, kwargs, accepted)
        except Exception as exc:
            if not is_transient(exc):
                raise
            first_failure: BaseException | None = exc
        # A transient failure: the retry policy takes over, with that failure as its first attempt.
        retrying = build_retrying(
            self._retry,
            method=method,
            path=path,
            operation=operation,
            on_retry=self._on_retry,
            elapsed=time.monotonic() - started,
        )
        attempts = 0

        def once() -> Reply:
            nonlocal attempts, first_failure
            attempts += 1
            if first_failure is not None:
                failure, first_failure = first_failure, None
                raise failure
            return self._once(method, path, kwargs, accepted)

        try:
            reply: Reply = retrying(once)
        except TransientHTTPStatus as exc:
            detail = f": {exc.detail}" if exc.detail else ""
            raise WaldurUnavailable(
                f"Waldur unavailable: {method} {path} answered HTTP {exc.status}{detail} "
                f"(gave up after {attempts} attempt{'s' if attempts != 1 else ''})",
                method=method,
                path=path,
                status=exc.status,
            ) from None
        except httpx.TransportError as exc:
            raise WaldurUnavailable(
                f"Waldur unavailable: {method} {path} failed with {describe(exc)} "
                f"(gave up after {attempts} attempt{'s' if attempts != 1 else ''})",
                method=method,
                path=path,
                status=None,
            ) from None
        return reply

    @staticmethod
    def _request(method: str, path: str, kwargs: Mapping[str, Any]) -> tuple[str, bytes, Mapping[str, str]]:
        """Target (path and query), body and extra headers for what a waldur-api-client builder returned; encoded
        as httpx encodes them (`QueryParams`, compact UTF-8 JSON), so a capture made before reads the same."""
        unknown = kwargs.keys() - _BUILDER_KEYS
        if unknown:
            raise TypeError(f"unsupported request arguments for {method} {path}: {sorted(unknown)}")
        target = path
        params = kwargs.get("params")
        if params:
            query = str(httpx.QueryParams(params))
            if query:
                target = f"{path}?{query}"
        body: bytes = kwargs.get("content") or b""
        payload = kwargs.get("json")
        headers: Mapping[str, str] = kwargs.get("headers") or {}
        if payload is not None:
            body = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
            headers = {**headers, "Content-Type": "application/json"}
        return target, body, headers

    def _once(self, method: str, path: str, kwargs: Mapping[str, Any], accepted: frozenset[int]) -> Reply:
        target, body, headers = self._request(method, path, kwargs)
        try:
            answer = self._transport.send(method, target, body, headers)
        except httpx.TransportError:
            raise
        except httpx.HTTPError as exc:
            raise WaldurError(
                f"Waldur request {method} {path} failed: {type(exc).__name__}", method=method, path=path
            ) from None
        reply = Reply(method, path, answer)
        status = answer.status
        if status in accepted:
            return reply
        detail = self._detail(answer)
        if is_transient_status(status):
            raise TransientHTTPStatus(status, detail, parse_retry_after(answer.headers.get("retry-after")))
        suffix = f": {detail}" if detail else ""
        if 400 <= status < 500:
            raise WaldurRejected(
                f"Waldur rejected {method} {path}: HTTP {status}{suffix}",
                method=method,
                path=path,
                status=status,
                detail=detail,
            )
        raise WaldurError(
            f"Waldur answered {method} {path} with unexpected HTTP {status}{suffix}",
            method=method,
            path=path,
            status=status,
        )

    def _detail(self, answer: Answer) -> str:
        """The body's ``detail`` (or the body itself), short and without the token."""
        text = ""
        try:
            body = _loads(answer.content)
        except ValueError:
            text = answer.content.decode("utf-8", errors="replace").strip()
        else:
            if isinstance(body, dict) and "detail" in body:
                text = str(body["detail"])
            elif isinstance(body, (dict, list)):
                text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
            else:
                text = str(body)
        text = " ".join(text.split())
        if self._token in text:
            text = text.replace(self._token, "***")
        if len(text) > DETAIL_LIMIT:
            text = text[: DETAIL_LIMIT - 1] + "…"
        return text

    @staticmethod
    def _json(reply: Reply) -> Any:
        try:
            return _loads(reply.answer.content)
        except ValueError:
            raise WaldurError(
                f"Waldur answered {reply.method} {reply.path} with a body that is not JSON",
                method=reply.method,
                path=reply.path,
                status=reply.status,
            ) from None

    def _json_object(self, reply: Reply) -> dict[str, Any]:
        body = self._json(reply)
        if not isinstance(body, dict):
            raise WaldurError(
                f"Waldur answered {reply.method} {reply.path} with a {type(body).__name__}, expected a JSON object",
                method=reply.method,
                path=reply.path,
                status=reply.status,
            )
        return body

    def _list_collected(self, operation: str, kwargs: Mapping[str, Any]) -> list[dict[str, Any]]:
        collected = CollectedListing()
        self._list_all(operation, kwargs, collected)
        return collected.items

    def _list_all(self, operation: str, kwargs: Mapping[str, Any], into: ListingSink) -> int:
        """Every page of a list endpoint into `into`; starts over (`into.restart()`) when the collection changes
        under the listing. Returns the number of items."""
        method = str(kwargs["method"]).upper()
        path = str(kwargs["url"])
        reason = ""
        for attempt in range(LISTING_RESTARTS + 1):
            if attempt:
                into.restart()
            try:
                return self._list_once(operation, kwargs, method, path, into)
            except _ListingChanged as exc:
                reason = str(exc)
                log.info("waldur.listing_restarted", method=method, path=path, attempt=attempt + 1, reason=reason)
        raise WaldurPaginationError(
            f"Waldur listing {method} {path} kept changing while it was read ({reason})",
            method=method,
            path=path,
            status=200,
        )

    def _list_once(self, operation: str, kwargs: Mapping[str, Any], method: str, path: str, into: ListingSink) -> int:
        base_params = {k: v for k, v in dict(kwargs.get("params") or {}).items() if k != "page"}
        base_params["page_size"] = self._page_size
        taken = 0
        seen: set[str] = set()
        expected: int | None = None
        page = 1
        pages = 0

        def fail(what: str) -> WaldurPaginationError:
            return WaldurPaginationError(
                f"Waldur listing {method} {path} is inconsistent: {what}", method=method, path=path, status=200
            )

        while True:
            params = dict(base_params)
            if page > 1:
                params["page"] = page
            page_kwargs = {**kwargs, "params": params}
            reply = self._send(operation, page_kwargs, ok=(200, 404) if page > 1 else (200,))
            if reply.status == 404:
                raise _ListingChanged(f"page {page} vanished")
            pages += 1
            count = self._result_count(reply.answer, fail)
            if expected is None:
                expected = count
            elif count != expected:
                raise _ListingChanged(f"X-Result-Count went from {expected} to {count}")
            body = self._json(reply)
            if not isinstance(body, list):
                raise fail(f"page {page} is a {type(body).__name__}, expected a JSON array")
            for item in body:
                if not isinstance(item, dict):
                    raise fail(f"page {page} holds a {type(item).__name__}, expected JSON objects")
                key = item.get("uuid")
                if isinstance(key, str):
                    if key in seen:
                        raise _ListingChanged(f"item {key} seen twice")
                    seen.add(key)
            page_items = len(body)
            into.take(body)
            taken += page_items
            del body  # the sink keeps what it needs of the page
            next_page = self._next_page(reply.answer, fail)
            if next_page is None:
                break
            if next_page <= page:
                raise fail(f"Link rel=next points back to page {next_page} from page {page}")
            if pages > expected // max(page_items, 1) + 2:
                raise fail(f"more pages than {expected} items can fill")
            page = next_page
        if taken != expected:
            raise fail(f"got {taken} items but X-Result-Count is {expected}")
        return taken

    @staticmethod
    def _result_count(answer: Answer, fail: Callable[[str], WaldurPaginationError]) -> int:
        raw = answer.headers.get("x-result-count")
        if raw is None:
            raise fail("no X-Result-Count header")
        try:
            count = int(raw.strip())
        except ValueError:
            raise fail(f"X-Result-Count is not a number ({raw[:40]!r})") from None
        if count < 0:
            raise fail("X-Result-Count is negative")
        return count

    @staticmethod
    def _next_page(answer: Answer, fail: Callable[[str], WaldurPaginationError]) -> int | None:
        url = next_link(answer.headers.get("link") or "")
        if not url:
            return None
        values = parse_qs(urlsplit(url).query).get("page")
        if not values:
            raise fail("Link rel=next has no page parameter")
        try:
            return int(values[0])
        except ValueError:
            raise fail(f"Link rel=next has a bad page parameter ({values[0][:40]!r})") from None
