"""The FastAPI application: the storage proxy API served from the mirrors (spec http-api.md).

No Waldur call per request: normal mode answers from `MirrorView`s (indexes and pre-rendered JSON per mirror
version, see `query.py`); debug mode adds the live provider offering, fetched through `offering_details` and cached
for 60 s. Responses are built as bytes and returned as plain `Response`s (FastAPI's encoder is never run on large
payloads); the Pydantic models of `schemas.py` only describe them in the OpenAPI document.

Every request first passes `_Guard`, a plain ASGI middleware: oversized query strings are refused (414 over 4 KiB,
422 for a value over 256 characters), then every path but ``/healthz`` is authenticated (401/403 with a fixed body),
and the request is counted in the HTTP metrics.
"""

from __future__ import annotations

import math
import re
import threading
import time
import uuid as uuid_mod
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, tzinfo
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import structlog
from fastapi import FastAPI, Query
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cscs_storage_daemon import __version__
from cscs_storage_daemon.api.auth import Authenticator, AuthResult, NoAuth
from cscs_storage_daemon.api.query import Filters, MirrorView, MirrorViews, compact_json
from cscs_storage_daemon.api.schemas import (
    DebugResponse,
    ErrorResponse,
    HealthResponse,
    ResourceState,
    StorageResourcesResponse,
    ValidationErrorResponse,
)
from cscs_storage_daemon.clock import Clock, SystemClock
from cscs_storage_daemon.envelope import envelope
from cscs_storage_daemon.health import HealthState, healthz
from cscs_storage_daemon.metrics import Metrics
from cscs_storage_daemon.mirror import OfferingMirror

if TYPE_CHECKING:
    from cscs_storage_daemon.config import OfferingConfig

__all__ = [
    "MASK",
    "MAX_QUERY_BYTES",
    "MAX_VALUE_CHARS",
    "OfferingDetailsCache",
    "OfferingInfo",
    "create_app",
    "mask_secrets",
    "storage_system_error",
]

log = structlog.get_logger("cscs_storage_daemon.api")

MASK = "***"
MAX_QUERY_BYTES = 4096
MAX_VALUE_CHARS = 256
RESOURCES_PATH = "/api/storage-resources/"
OPEN_PATHS = frozenset({"/healthz"})

_SECRET_NAME = re.compile(r"token|secret|password|key", re.IGNORECASE)
_DASHED_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


# ------------------------------------------------------------------------------------------------- offerings


@dataclass(frozen=True)
class OfferingInfo:
    """What the API needs to know about a configured offering besides its mirror.

    `secrets` are values that must never appear in a response (the offering's Waldur API token); `zone` is the
    time zone of ``meta.date``.
    """

    uuid: str
    api_url: str
    backend_type: str = "cscs-hpc-storage"
    backend_settings: Mapping[str, Any] = field(default_factory=dict)
    backend_components: Mapping[str, Any] = field(default_factory=dict)
    zone: tzinfo = UTC
    secrets: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: OfferingConfig) -> OfferingInfo:
        token = config.waldur_api_token.get_secret_value()
        return cls(
            uuid=config.offering_uuid_hex,
            api_url=config.waldur_api_url,
            backend_type=config.backend_type,
            backend_settings=config.backend_settings.as_dict(),
            backend_components=config.components_dict(),
            zone=config.backend_settings.zoneinfo,
            secrets=(token,) if token else (),
        )


def _offering_info(value: OfferingConfig | OfferingInfo) -> OfferingInfo:
    if isinstance(value, OfferingInfo):
        return value
    return OfferingInfo.from_config(value)


@dataclass
class _Served:
    slug: str
    mirror: OfferingMirror
    info: OfferingInfo
    views: MirrorViews


# ----------------------------------------------------------------------------------------------- masking


def _mask_url(text: str) -> str:
    """``https://user:pw@host/`` → ``https://user:***@host/``."""
    if "@" not in text or "://" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    if parts.password is None:
        return text
    netloc = f"{parts.username or ''}:{MASK}@{parts.hostname or ''}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _mask_text(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 4 and secret in text:
            text = text.replace(secret, MASK)
    return _mask_url(text)


def _json_safe(value: Any, secrets: Sequence[str], *, mask_names: bool, key: str | None = None) -> Any:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for name, item in value.items():
            text = str(name)
            if text == "secret_options":
                continue
            if mask_names and _SECRET_NAME.search(text) and item is not None:
                out[text] = MASK
            else:
                out[text] = _json_safe(item, secrets, mask_names=mask_names, key=text)
        return out
    if isinstance(value, list | tuple | set | frozenset):
        return [_json_safe(item, secrets, mask_names=mask_names) for item in value]
    if isinstance(value, str):
        if key is not None and (key == "uuid" or key.endswith("_uuid")) and _DASHED_UUID.fullmatch(value):
            return value.replace("-", "").lower()
        return _mask_text(value, secrets)
    if isinstance(value, uuid_mod.UUID):
        return value.hex
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float):
        return value
    return _mask_text(str(value), secrets)


def mask_secrets(value: Any, secrets: Sequence[str] = ()) -> Any:
    """A JSON-safe copy with every value under a key containing token/secret/password/key (any case) replaced by
    ``"***"``, ``secret_options`` left out, known secret strings and URL passwords masked, UUIDs as hex."""
    return _json_safe(value, secrets, mask_names=True)


def offering_details_safe(value: Any, secrets: Sequence[str] = ()) -> Any:
    """Waldur's provider offering, JSON-safe: without ``secret_options``, UUIDs hex, dates ISO, known secrets
    masked. Other attributes are kept as they are (every attribute of the offering)."""
    return _json_safe(value, secrets, mask_names=False)


# ---------------------------------------------------------------------------------------- offering details


class OfferingDetailsCache:
    """The live provider offering per slug, fetched on demand and kept `ttl` seconds (`error_ttl` for a failure).

    Thread-safe; concurrent requests for one slug share one fetch. `get` blocks: call it from a worker thread.
    """

    def __init__(
        self,
        fetch: Callable[[str], Mapping[str, Any]] | None,
        *,
        ttl: float = 60.0,
        error_ttl: float = 5.0,
        secrets: Sequence[str] = (),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._ttl = ttl
        self._error_ttl = error_ttl
        self._secrets = tuple(secrets)
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._slug_locks: dict[str, threading.Lock] = {}
        self._cache: dict[str, tuple[float, float, dict[str, Any]]] = {}  # slug -> (at, ttl, value)

    def _cached(self, slug: str) -> dict[str, Any] | None:
        hit = self._cache.get(slug)
        if hit is not None and self._monotonic() - hit[0] < hit[1]:
            return hit[2]
        return None

    def get(self, slug: str) -> dict[str, Any]:
        value = self._cached(slug)
        if value is not None:
            return value
        with self._lock:
            slug_lock = self._slug_locks.setdefault(slug, threading.Lock())
        with slug_lock:
            value = self._cached(slug)
            if value is not None:
                return value
            ttl = self._ttl
            if self._fetch is None:
                value, ttl = {"error": "offering details are not available in this mode"}, self._error_ttl
            else:
                try:
                    fetched = self._fetch(slug)
                    if not isinstance(fetched, Mapping):
                        raise TypeError(f"expected an object, got {type(fetched).__name__}")
                    value = offering_details_safe(fetched, self._secrets)
                except Exception as exc:
                    message = _mask_text(
                        f"Failed to fetch offering details: {type(exc).__name__}: {exc}", self._secrets
                    )
                    log.warning("http.offering_details_failed", offering=slug, error=message[:300])
                    value, ttl = {"error": message[:500]}, self._error_ttl
            self._cache[slug] = (self._monotonic(), ttl, value)
            return value


# ------------------------------------------------------------------------------------------ storage_system


def storage_system_error(value: str | None, allowed: Sequence[str]) -> dict[str, Any] | None:
    """The spec's 422 body for a missing, empty or unknown ``storage_system`` (None when `value` is allowed)."""
    allowed_values = list(allowed)
    first = allowed_values[0] if allowed_values else "<system_name>"
    if value is None:
        item = {
            "type": "missing",
            "loc": ["query", "storage_system"],
            "msg": "storage_system is mandatory.",
            "ctx": {"allowed_values": allowed_values, "help": "Add ?storage_system=<system_name> to your request"},
        }
    elif value == "":
        item = {
            "type": "enum_validation",
            "loc": ["query", "storage_system"],
            "msg": "storage_system cannot be empty.",
            "ctx": {
                "allowed_values": allowed_values,
                "help": f"Use ?storage_system={first} (not just ?storage_system=)",
            },
        }
    elif value not in allowed_values:
        item = {
            "type": "enum_validation",
            "loc": ["query", "storage_system"],
            "msg": "Invalid storage_system value.",
            "ctx": {
                "allowed_values": allowed_values,
                "help": "Use: " + " or ".join(f"?storage_system={slug}" for slug in allowed_values),
            },
        }
    else:
        return None
    return {"detail": [item]}


# ---------------------------------------------------------------------------------------------- responses


def _json_response(body: Any, status_code: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    try:
        content = compact_json(body)
    except ValueError:  # a non-finite number in raw Waldur data
        content = compact_json(_json_safe(body, (), mask_names=False))
    return Response(content, status_code=status_code, headers=headers, media_type="application/json")


_STORAGE_MARKER = b'"storageResources":[]'


def render_envelope(items: Sequence[bytes], *, date: datetime, pagination: dict[str, int]) -> bytes:
    """The envelope of `envelope()` around already rendered storage objects, as bytes."""
    skeleton = compact_json(envelope([], date=date, pagination=pagination))
    cut = skeleton.index(_STORAGE_MARKER) + len(_STORAGE_MARKER) - 1
    return b"".join((skeleton[:cut], b",".join(items), skeleton[cut:]))


_NOT_AUTHENTICATED = compact_json({"detail": "Not authenticated"})
_FORBIDDEN = compact_json({"detail": "Forbidden"})
_URI_TOO_LONG = compact_json({"detail": "Request-URI Too Long"})


async def _send_bytes(
    send: Send, status: int, body: bytes, extra: Sequence[tuple[bytes, bytes]] = (), content_type: bytes | None = None
) -> None:
    headers = [
        (b"content-type", content_type or b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------------------------ metrics


@dataclass(frozen=True)
class _HttpMetrics:
    requests: Counter
    duration: Histogram


_HTTP_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, _HttpMetrics] = weakref.WeakKeyDictionary()
_HTTP_METRICS_LOCK = threading.Lock()


def _http_metrics(registry: CollectorRegistry) -> _HttpMetrics:
    """The API's own metrics, registered once per registry (an app may be created twice on one `Metrics`)."""
    with _HTTP_METRICS_LOCK:
        found = _HTTP_METRICS.get(registry)
        if found is None:
            found = _HttpMetrics(
                requests=Counter(
                    "cscs_http_requests_total", "HTTP API requests", ["handler", "code"], registry=registry
                ),
                duration=Histogram(
                    "cscs_http_request_duration_seconds",
                    "HTTP API request duration",
                    ["handler"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
                    registry=registry,
                ),
            )
            _HTTP_METRICS[registry] = found
        return found


# ------------------------------------------------------------------------------------------------- guard


class _Guard:
    """Plain ASGI middleware: size limits, authentication, metrics (in that order)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        authenticator: Authenticator,
        http_metrics: _HttpMetrics,
        handlers: Callable[[], frozenset[str]],
    ) -> None:
        self.app = app
        self.authenticator = authenticator
        self.metrics = http_metrics
        self._handlers = handlers
        self._known: frozenset[str] | None = None

    def _handler(self, path: str) -> str:
        if self._known is None:
            self._known = self._handlers()
        return path if path in self._known else "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, send_and_note)
        finally:
            handler = self._handler(scope.get("path", ""))
            self.metrics.requests.labels(handler, str(status[0])).inc()
            self.metrics.duration.labels(handler).observe(time.perf_counter() - started)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        query: bytes = scope.get("query_string", b"")
        if len(query) > MAX_QUERY_BYTES:
            await _send_bytes(send, 414, _URI_TOO_LONG)
            return
        if len(query) > MAX_VALUE_CHARS:
            too_long = _too_long_parameter(query)
            if too_long is not None:
                await _send_bytes(send, 422, too_long)
                return
        if scope.get("path", "") not in OPEN_PATHS:
            result = await self._authenticate(scope)
            if result is AuthResult.UNAUTHENTICATED:
                await _send_bytes(send, 401, _NOT_AUTHENTICATED, [(b"www-authenticate", b"Bearer")])
                return
            if result is AuthResult.FORBIDDEN:
                await _send_bytes(send, 403, _FORBIDDEN)
                return
        await self.app(scope, receive, send)

    async def _authenticate(self, scope: Scope) -> AuthResult:
        authenticator = self.authenticator
        values = [value for name, value in scope.get("headers", ()) if name.lower() == b"authorization"]
        if isinstance(authenticator, NoAuth):
            return AuthResult.ALLOWED
        if len(values) > 1:
            return AuthResult.UNAUTHENTICATED
        header = values[0].decode("latin-1") if values else None
        if authenticator.blocking:
            return await run_in_threadpool(authenticator.check, header)
        return authenticator.check(header)


def _too_long_parameter(query: bytes) -> bytes | None:
    """A FastAPI-style 422 body when a parameter name or value exceeds `MAX_VALUE_CHARS` characters."""
    for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if len(value) > MAX_VALUE_CHARS or len(name) > MAX_VALUE_CHARS:
            shown = name if len(name) <= MAX_VALUE_CHARS else name[:MAX_VALUE_CHARS] + "…"
            return compact_json(
                {
                    "detail": [
                        {
                            "type": "string_too_long",
                            "loc": ["query", shown],
                            "msg": f"String should have at most {MAX_VALUE_CHARS} characters",
                            "ctx": {"max_length": MAX_VALUE_CHARS},
                        }
                    ]
                }
            )
    return None


# ---------------------------------------------------------------------------------------------- the app


_DESCRIPTION = """\
CSCS storage resources, served from the daemon's in-memory mirror of Waldur (no Waldur call per request).

Filters are exact, case-sensitive and combined with AND; an empty `data_type` or `status` is no filter.
`paginate` describes the whole filtered set. A missing, empty or unknown `storage_system` gives a 422 whose
`ctx` lists the allowed values.
"""


def create_app(
    *,
    offerings: Sequence[tuple[str, OfferingMirror, OfferingConfig | OfferingInfo]],
    health: HealthState,
    metrics: Metrics,
    auth: Authenticator | None = None,
    offering_details: Callable[[str], Mapping[str, Any]] | None = None,
    render_config: Callable[[], Mapping[str, Any]] | None = None,
    clock: Clock | None = None,
    healthz_broker_grace: float = 60.0,
    offering_details_ttl: float = 60.0,
) -> FastAPI:
    """The HTTP API over `offerings` (``(slug, mirror, offering config)``, in config order).

    `offering_details(slug)` fetches the live provider offering for debug mode (cached `offering_details_ttl`
    seconds; an exception gives ``{"error": ...}``). `render_config()` returns the effective configuration with
    secrets masked (`config.render_effective_config`); debug mode takes the offering's entry from it when present,
    else uses the offering config given here. `auth` defaults to `NoAuth` (the caller checks the listen address
    with `check_listen_allowed`).
    """
    clock = clock or SystemClock()
    authenticator: Authenticator = auth or NoAuth()
    served: dict[str, _Served] = {}
    for slug, mirror, config in offerings:
        if slug in served:
            raise ValueError(f"two offerings share the storage system slug {slug!r}")
        served[slug] = _Served(slug, mirror, _offering_info(config), MirrorViews(mirror))
        health.add_offering(slug)
    slugs = list(served)
    secrets = tuple(secret for item in served.values() for secret in item.info.secrets)
    details = OfferingDetailsCache(offering_details, ttl=offering_details_ttl, secrets=secrets)

    app = FastAPI(
        title="CSCS storage daemon API",
        version=__version__,
        description=_DESCRIPTION,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    protected: dict[int | str, dict[str, Any]] = {
        414: {"model": ErrorResponse, "description": "Query string over 4 KiB"},
    }
    if not isinstance(authenticator, NoAuth):
        protected[401] = {"model": ErrorResponse, "description": "Missing or bad credential"}
        protected[403] = {"model": ErrorResponse, "description": "Valid credential without the required role"}

    def agent_offering_config(item: _Served) -> dict[str, Any]:
        info = item.info
        source: Mapping[str, Any] | None = None
        if render_config is not None:
            try:
                rendered = render_config()
            except Exception as exc:
                log.warning("http.render_config_failed", error=f"{type(exc).__name__}: {exc}"[:300])
                rendered = {}
            for entry in rendered.get("offerings") or []:
                if not isinstance(entry, Mapping):
                    continue
                entry_uuid = str(entry.get("waldur_offering_uuid", "")).replace("-", "").lower()
                if entry_uuid == info.uuid.replace("-", "").lower():
                    source = entry
                    break
        if source is not None:
            config = {
                "uuid": info.uuid.replace("-", "").lower(),
                "api_url": source.get("waldur_api_url", info.api_url),
                "backend_type": source.get("backend_type", info.backend_type),
                "backend_settings": source.get("backend_settings") or {},
                "backend_components": source.get("backend_components") or {},
            }
        else:
            config = {
                "uuid": info.uuid.replace("-", "").lower(),
                "api_url": info.api_url,
                "backend_type": info.backend_type,
                "backend_settings": dict(info.backend_settings),
                "backend_components": dict(info.backend_components),
            }
        masked: dict[str, Any] = mask_secrets(config, secrets)
        return masked

    @app.get(
        RESOURCES_PATH,
        response_model=StorageResourcesResponse | DebugResponse,
        responses={
            200: {"description": "The storage resources (or, with debug=true, the raw Waldur data)"},
            422: {"model": ValidationErrorResponse, "description": "Invalid parameters"},
            **protected,
        },
        summary="List storage resources",
    )
    async def storage_resources(
        storage_system: Annotated[str | None, Query(description="The slug of a configured offering")] = None,
        data_type: Annotated[
            str | None, Query(max_length=MAX_VALUE_CHARS, description="Effective storage data type")
        ] = None,
        status: Annotated[str | None, Query(max_length=MAX_VALUE_CHARS, description="Mapped status")] = None,
        state: Annotated[ResourceState | None, Query(description="Waldur resource state")] = None,
        page: Annotated[int, Query(ge=1)] = 1,
        page_size: Annotated[int, Query(ge=1, le=500)] = 100,
        debug: Annotated[bool, Query(description="Raw Waldur data instead of the storage format")] = False,
    ) -> Response:
        error = storage_system_error(storage_system, slugs)
        if error is not None or storage_system is None:
            return JSONResponse(error, status_code=422)
        item = served[storage_system]
        filters = Filters(data_type=data_type or None, status=status or None, state=state.value if state else None)
        view: MirrorView = item.views.current()
        if debug:
            return await _debug_response(item, view, filters, page, page_size)
        result = view.page(filters, page, page_size)
        now = clock.now().astimezone(item.info.zone)
        body = render_envelope(view.storage_json(result), date=now, pagination=result.pagination)
        return Response(body, media_type="application/json")

    async def _debug_response(item: _Served, view: MirrorView, filters: Filters, page: int, size: int) -> Response:
        result = view.raw_page(filters, page, size)
        waldur_details = await run_in_threadpool(details.get, item.slug)
        body = {
            "status": "success",
            "debug_mode": True,
            "agent_offering_config": agent_offering_config(item),
            "waldur_offering_details": waldur_details,
            "raw_resources": {
                "resources": view.raw_resources(result),
                "pagination": result.pagination,
                "filters_applied": {
                    "storage_system": item.slug,
                    "data_type": filters.data_type,
                    "status": filters.status,
                    "state": filters.state,
                },
            },
        }
        return _json_response(body)

    @app.get(
        "/healthz",
        response_model=HealthResponse,
        responses={503: {"model": HealthResponse, "description": "Not ready, with the failing parts"}},
        summary="Health",
    )
    async def healthz_route() -> Response:
        counts = {slug: item.views.current().total for slug, item in served.items()}
        code, body = healthz(health.view(), now=clock.now(), grace=healthz_broker_grace, resources=counts)
        return _json_response(body, status_code=code, headers={"Cache-Control": "no-store"})

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **protected},
        summary="Prometheus metrics",
    )
    async def metrics_route() -> Response:
        content = await run_in_threadpool(generate_latest, metrics.registry)
        return Response(content, media_type=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_route() -> Response:
        return _json_response(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs_route() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            operation = schema["paths"][RESOURCES_PATH]["get"]
            for parameter in operation.get("parameters", []):
                if parameter.get("name") == "storage_system":
                    parameter["required"] = True
                    parameter["schema"] = {"type": "string", "enum": slugs, "title": "Storage System"}
            if not isinstance(authenticator, NoAuth):
                components = schema.setdefault("components", {})
                components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                for path, item in schema["paths"].items():
                    if path not in OPEN_PATHS:
                        for op in item.values():
                            op["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    def handlers() -> frozenset[str]:
        return frozenset(getattr(route, "path", "") for route in app.routes)

    app.add_middleware(
        _Guard,  # type: ignore[arg-type]
        authenticator=authenticator,
        http_metrics=_http_metrics(metrics.registry),
        handlers=handlers,
    )
    app.state.views = {slug: item.views for slug, item in served.items()}
    return app


# A view of the JSON text of the three storage_system bodies, for documentation and tests.
def storage_system_error_json(value: str | None, allowed: Sequence[str]) -> bytes | None:
    body = storage_system_error(value, allowed)
    return None if body is None else compact_json(body)
