"""Access control of the HTTP API (spec http-api.md "Access control").

An authenticator looks at the ``Authorization`` header of a request and answers `AuthResult.ALLOWED`,
`UNAUTHENTICATED` (401: missing or bad credential) or `FORBIDDEN` (403: a valid credential without the required
role). The HTTP layer never tells the client which check failed; the reason goes to the log only.

* `NoAuth` — everything allowed; only on a loopback listener (`check_listen_allowed`).
* `TokenAuth` — ``Authorization: Bearer <t>`` compared in constant time with every token of a file (one per line,
  blank lines and ``#`` comments ignored). The file is re-read when it changes, so tokens rotate without a restart.
* `OidcAuth` — a JWT signed RS256 or ES256 by a key of the issuer's JWKS, with ``exp``, ``iss`` and ``aud``
  required and checked, and optionally a role or group in a claim (``roles``, ``groups``, or a dotted path such as
  ``realm_access.roles`` / ``resource_access.<client>.roles``).

`build_authenticator(http_settings)` builds the one the configuration asks for; it raises `ConfigError` (exit 78).
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import httpx
import jwt
import structlog

from cscs_storage_daemon.config import HTTP_TOKEN_CREDENTIAL, ConfigError

if TYPE_CHECKING:
    from cscs_storage_daemon.config import HttpSettings, OidcSettings

__all__ = [
    "ALLOWED_ALGORITHMS",
    "AuthResult",
    "Authenticator",
    "JwksCache",
    "NoAuth",
    "OidcAuth",
    "TokenAuth",
    "bearer_token",
    "build_authenticator",
    "check_listen_allowed",
    "is_loopback_listen",
]

log = structlog.get_logger("cscs_storage_daemon.api.auth")

ALLOWED_ALGORITHMS = ("RS256", "ES256")
MAX_CREDENTIAL_LENGTH = 8192  # a bearer token longer than this is rejected unread


class AuthResult(enum.Enum):
    ALLOWED = "allowed"
    UNAUTHENTICATED = "unauthenticated"  # 401
    FORBIDDEN = "forbidden"  # 403


class Authenticator(Protocol):
    """What the HTTP layer needs from an authenticator."""

    @property
    def scheme(self) -> str:
        """``none``, ``token`` or ``oidc``."""
        ...

    @property
    def blocking(self) -> bool:
        """True when `check` may do network I/O (the HTTP layer then runs it in a worker thread)."""
        ...

    def check(self, authorization: str | None) -> AuthResult: ...


def bearer_token(authorization: str | None) -> str | None:
    """The credential of an ``Authorization: Bearer <t>`` header value (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, credential = authorization.strip().partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential or len(credential) > MAX_CREDENTIAL_LENGTH:
        return None
    if any(c.isspace() for c in credential):
        return None
    return credential


# ------------------------------------------------------------------------------------------------------- listen


def _listen_host(listen: str) -> str:
    text = listen.strip()
    match = re.fullmatch(r"\[([^\]]+)\](?::[0-9]+)?|([^:\[\]]*)(?::[0-9]+)?", text)
    if match is None:
        return text
    return match.group(1) or match.group(2) or ""


def is_loopback_listen(listen: str) -> bool:
    """True when the ``host:port`` listen address is a loopback address (``127.0.0.0/8``, ``::1``, ``localhost``).

    Any other name is not trusted to be loopback (it could resolve anywhere); an empty host means all interfaces.
    """
    host = _listen_host(listen)
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen_allowed(listen: str, auth: str) -> None:
    """Raise `ConfigError` when ``auth: none`` would serve on a non-loopback address (the CLI exits 78)."""
    if auth == "none" and not is_loopback_listen(listen):
        raise ConfigError(
            None,
            "daemon.http.auth",
            f"none is only allowed on a loopback listener (listen is {listen}): use token or oidc",
        )


# --------------------------------------------------------------------------------------------------------- none


class NoAuth:
    scheme = "none"
    blocking = False

    def check(self, authorization: str | None) -> AuthResult:
        return AuthResult.ALLOWED


# -------------------------------------------------------------------------------------------------------- token


def parse_token_file(text: str) -> list[str]:
    """Tokens of a token file: one per line, stripped; blank lines and lines starting with ``#`` skipped."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


class TokenAuth:
    """Static bearer tokens, from a list or a file (re-read at most once per `recheck` seconds when it changed)."""

    scheme = "token"
    blocking = False

    def __init__(
        self,
        tokens: Iterable[str] = (),
        *,
        token_file: str | Path | None = None,
        recheck: float = 2.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._file = Path(token_file) if token_file is not None else None
        self._recheck = recheck
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._checked = monotonic()
        self._tokens: tuple[bytes, ...] = tuple(t.encode("utf-8") for t in tokens if t)
        if self._file is not None:
            self._load(initial=True)
        if not self._tokens:
            where = f"{self._file}" if self._file is not None else "the token list"
            raise ConfigError(None, "daemon.http.token_file", f"no token in {where}")
        if any(len(t) < 16 for t in self._tokens):
            log.warning("http.auth.short_token", hint="use tokens of at least 16 random characters")

    def _load(self, *, initial: bool = False) -> None:
        assert self._file is not None
        try:
            stat = self._file.stat()
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            if stamp == self._stamp:
                return
            tokens = parse_token_file(self._file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            if initial:
                raise ConfigError(None, "daemon.http.token_file", f"cannot read {self._file}: {exc}") from None
            log.error("http.auth.token_file_unreadable", file=str(self._file), error=type(exc).__name__)
            return  # keep the tokens we have
        if not tokens and not initial:
            log.error("http.auth.token_file_empty", file=str(self._file))
            return
        self._tokens = tuple(t.encode("utf-8") for t in tokens)
        self._stamp = stamp
        if not initial:
            log.info("http.auth.tokens_reloaded", file=str(self._file), tokens=len(tokens))

    def _refresh(self) -> None:
        if self._file is None:
            return
        now = self._monotonic()
        if now - self._checked < self._recheck:
            return
        with self._lock:
            if now - self._checked < self._recheck:
                return
            self._checked = now
            self._load()

    def check(self, authorization: str | None) -> AuthResult:
        credential = bearer_token(authorization)
        if credential is None:
            return AuthResult.UNAUTHENTICATED
        self._refresh()
        given = credential.encode("utf-8")
        matched = False
        for token in self._tokens:  # every token is compared: the time does not depend on which one matched
            matched |= hmac.compare_digest(given, token)
        return AuthResult.ALLOWED if matched else AuthResult.UNAUTHENTICATED


# --------------------------------------------------------------------------------------------------------- oidc


class JwksError(Exception):
    pass


def _default_fetch(url: str, timeout: float) -> Any:
    response = httpx.get(url, timeout=timeout, follow_redirects=False, headers={"Accept": "application/json"})
    if response.status_code != 200:
        raise JwksError(f"GET {url}: HTTP {response.status_code}")
    return response.json()


class JwksCache:
    """The issuer's signing keys by ``kid``, fetched from ``jwks_url`` (or the issuer's discovery document).

    Keys are kept for `ttl` seconds. A token naming an unknown ``kid`` triggers a refetch (key rotation), but at
    most once per `min_refresh` seconds, so tokens with made-up key ids cannot make the daemon hammer the issuer.
    Only RS256 and ES256 signing keys are kept.
    """

    def __init__(
        self,
        issuer: str,
        jwks_url: str | None = None,
        *,
        ttl: float = 300.0,
        min_refresh: float = 30.0,
        timeout: float = 5.0,
        fetch: Callable[[str, float], Any] = _default_fetch,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.issuer = issuer
        self._jwks_url = jwks_url
        self._ttl = ttl
        self._min_refresh = min_refresh
        self._timeout = timeout
        self._fetch = fetch
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None

    def _url(self) -> str:
        if self._jwks_url is None:
            discovery = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
            document = self._fetch(discovery, self._timeout)
            url = document.get("jwks_uri") if isinstance(document, Mapping) else None
            if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
                raise JwksError(f"{discovery}: no usable jwks_uri")
            self._jwks_url = url
        return self._jwks_url

    def _load(self) -> None:
        self._attempted_at = self._monotonic()
        document = self._fetch(self._url(), self._timeout)
        if not isinstance(document, Mapping):
            raise JwksError("the JWKS is not a JSON object")
        keys: dict[str | None, jwt.PyJWK] = {}
        for item in document.get("keys") or []:
            if not isinstance(item, dict) or item.get("use") not in (None, "sig"):
                continue
            try:
                key = jwt.PyJWK(item)
            except jwt.PyJWTError:
                continue
            if key.algorithm_name not in ALLOWED_ALGORITHMS:
                continue
            kid = item.get("kid")
            keys[kid if isinstance(kid, str) else None] = key
        self._keys = keys
        self._fetched_at = self._attempted_at
        log.info("http.auth.jwks_loaded", keys=len(keys))

    def key_for(self, kid: str | None) -> jwt.PyJWK | None:
        """The key for `kid` (a token without ``kid`` uses the only key, when there is exactly one)."""
        now = self._monotonic()
        with self._lock:
            stale = self._fetched_at is None or now - self._fetched_at >= self._ttl
            missing = self._find(kid) is None
            recently = self._attempted_at is not None and now - self._attempted_at < self._min_refresh
            if (stale or missing) and not recently:
                try:
                    self._load()
                except (JwksError, httpx.HTTPError, ValueError) as exc:
                    # Keep the keys we had (an issuer outage must not lock everybody out at once).
                    log.warning("http.auth.jwks_fetch_failed", error=f"{type(exc).__name__}: {exc}"[:300])
            return self._find(kid)

    def _find(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is not None:
            return self._keys.get(kid)
        if len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return None


def claim_values(claims: Mapping[str, Any], path: str) -> list[str]:
    """The string values of a claim: a list of strings, or one string split on white space (``scope``).

    `path` is a claim name, or a dotted path into nested objects (``realm_access.roles``); a claim whose own name
    contains dots (``https://example.org/roles``) is found too.
    """
    value: Any
    if path in claims:
        value = claims[path]
    else:
        value = claims
        for part in path.split("."):
            if not isinstance(value, Mapping) or part not in value:
                return []
            value = value[part]
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [item for item in value if isinstance(item, str)]
    return []


class _Denied(Exception):
    def __init__(self, result: AuthResult, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


class OidcAuth:
    """JWT bearer tokens of one issuer and audience, optionally with a required role."""

    scheme = "oidc"
    blocking = True

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        jwks_url: str | None = None,
        required_role: str | None = None,
        role_claim: str = "roles",
        leeway: float = 30.0,
        jwks: JwksCache | None = None,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.required_role = required_role
        self.role_claim = role_claim
        self.leeway = leeway
        self.jwks = jwks or JwksCache(issuer, jwks_url)
        stripped = issuer.rstrip("/")
        self._issuers = (stripped, stripped + "/")

    @classmethod
    def from_settings(cls, settings: OidcSettings) -> OidcAuth:
        return cls(
            issuer=settings.issuer,
            audience=settings.audience,
            jwks_url=settings.jwks_url,
            required_role=settings.required_role,
            role_claim=settings.role_claim,
        )

    def verify(self, token: str) -> dict[str, Any]:
        """The verified claims; raises `_Denied` with the result and the reason (for the log)."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _Denied(AuthResult.UNAUTHENTICATED, "malformed token") from None
        alg = header.get("alg")
        if alg not in ALLOWED_ALGORITHMS:
            raise _Denied(AuthResult.UNAUTHENTICATED, f"algorithm {str(alg)[:20]!r} not allowed")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _Denied(AuthResult.UNAUTHENTICATED, "malformed kid")
        key = self.jwks.key_for(kid)
        if key is None:
            raise _Denied(AuthResult.UNAUTHENTICATED, "unknown signing key")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=list(ALLOWED_ALGORITHMS),
                audience=self.audience,
                issuer=self._issuers,
                leeway=self.leeway,
                options={"require": ["exp", "iss", "aud"], "verify_signature": True},
            )
        except jwt.PyJWTError as exc:
            raise _Denied(AuthResult.UNAUTHENTICATED, type(exc).__name__) from None
        if self.required_role is not None and self.required_role not in claim_values(claims, self.role_claim):
            raise _Denied(AuthResult.FORBIDDEN, f"no {self.required_role!r} in claim {self.role_claim!r}")
        return claims

    def check(self, authorization: str | None) -> AuthResult:
        token = bearer_token(authorization)
        if token is None:
            return AuthResult.UNAUTHENTICATED
        try:
            claims = self.verify(token)
        except _Denied as denied:
            log.info("http.auth.denied", reason=denied.reason, result=denied.result.value)
            return denied.result
        log.debug("http.auth.allowed", sub=str(claims.get("sub"))[:100])
        return AuthResult.ALLOWED


# ------------------------------------------------------------------------------------------------------ factory


def _token_file(http: HttpSettings) -> Path:
    if http.token_file is not None:
        return Path(http.token_file)
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory:
        return Path(directory) / HTTP_TOKEN_CREDENTIAL
    raise ConfigError(
        None,
        "daemon.http.token_file",
        f"required when auth is token (or provide the systemd credential {HTTP_TOKEN_CREDENTIAL})",
    )


def build_authenticator(http: HttpSettings, *, listen: str | None = None) -> Authenticator:
    """The authenticator for ``daemon.http`` (`listen` overrides ``http.listen``, e.g. from the command line).

    Raises `ConfigError` when ``none`` is asked for on a non-loopback listener, when the token file is missing,
    unreadable or empty, or when ``oidc`` has no ``oidc`` settings.
    """
    check_listen_allowed(listen or http.listen, http.auth)
    if http.auth == "none":
        return NoAuth()
    if http.auth == "token":
        return TokenAuth(token_file=_token_file(http))
    if http.auth == "oidc":
        if http.oidc is None:
            raise ConfigError(None, "daemon.http.oidc", "required when auth is oidc (issuer and audience at least)")
        return OidcAuth.from_settings(http.oidc)
    raise ConfigError(None, "daemon.http.auth", f"unknown auth {http.auth!r}")
