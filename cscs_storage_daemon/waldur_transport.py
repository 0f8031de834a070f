"""How the gateway's requests reach Waldur: one small interface, two implementations.

`WaldurGateway` (gateway.py) decides *what* to ask — builder, retries, errors, pagination — and hands each request
to a `WaldurTransport` as four plain values: the method, the target (path and encoded query, exactly as sent), the
body and the extra headers. The transport answers with an `Answer` (status, headers, body) or raises an
`httpx.TransportError` when no answer came. The shape follows httpx's own split between a client and its
transports, one level up:

* `HttpxTransport` sends over any `httpx.BaseTransport`: `httpx.HTTPTransport` in production, the capture's
  recording transport under ``run --record``, `httpx.MockTransport` in tests. It owns the request headers (the
  ``Authorization`` token among them) and the timeouts;
* the replay answers from a capture with no HTTP at all (`replay.ReplayTransport`): building and parsing httpx
  requests and responses was a fifth of a replay's time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import httpx


@dataclass(frozen=True, slots=True)
class Answer:
    """What Waldur answered. ``headers`` is read with lower-case names (``retry-after``, ``link``,
    ``x-result-count``); ``content`` is the body as received, decoded from any content encoding."""

    status: int
    headers: Mapping[str, str]
    content: bytes


class WaldurTransport(Protocol):
    def send(self, method: str, target: str, body: bytes, headers: Mapping[str, str]) -> Answer:
        """Send one request; ``target`` is the path with its query (``/api/…/?a=1``). Raises `httpx.TransportError`
        (connect errors, timeouts, dropped connections) when no answer arrived."""
        ...

    def close(self) -> None: ...


class HttpxTransport:
    """A `WaldurTransport` over an httpx transport: one `httpx.Request` per call, straight to `handle_request`.

    No `httpx.Client` in between: its URL merging, cookie jar, auth flow and redirect handling cost two thirds of a
    call and Waldur needs none of them (token auth, no cookies, no redirects followed).
    """

    def __init__(
        self, root: str, headers: Mapping[str, str], *, timeout: float, transport: httpx.BaseTransport
    ) -> None:
        self._root = root.rstrip("/")
        self._headers = dict(headers)
        self._extensions = {"timeout": httpx.Timeout(timeout).as_dict()}
        self._transport = transport

    def send(self, method: str, target: str, body: bytes, headers: Mapping[str, str]) -> Answer:
        request = httpx.Request(
            method,
            self._root + target,
            headers={**self._headers, **headers} if headers else self._headers,
            content=body or None,
            extensions=self._extensions,
        )
        response = self._transport.handle_request(request)
        try:
            content = response.read()
        finally:
            response.close()
        return Answer(response.status_code, response.headers, content)

    def close(self) -> None:
        self._transport.close()

    def __repr__(self) -> str:
        return f"HttpxTransport({self._root!r})"
