"""Run the API under uvicorn in a background thread of the daemon.

`ApiServer.start()` binds the socket in the caller's thread (so ``EADDRINUSE`` and friends surface there as
`OSError`), starts uvicorn on it in a daemon thread and returns once it accepts connections. Port 0 binds a free
port; `port` tells which. uvicorn installs no signal handlers (the daemon owns signals) and leaves the logging
configuration alone (no access log; its own messages go through the standard ``uvicorn.*`` loggers).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import structlog
import uvicorn

if TYPE_CHECKING:
    from cscs_storage_daemon.daemon import Core
    from cscs_storage_daemon.health import HealthState

__all__ = ["ApiServer", "build_server", "parse_listen"]

log = structlog.get_logger("cscs_storage_daemon.api.server")


def parse_listen(listen: str) -> tuple[str, int]:
    """``"host:port"`` / ``"[v6]:port"`` → (host, port). Raises ValueError."""
    text = listen.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f'listen must be "host:port" (IPv6 as "[::1]:8080"), got {listen!r}')
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f'listen must be "host:port" (IPv6 as "[::1]:8080"), got {listen!r}')
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"listen port must be 0-65535, got {port!r}")
    return host, int(port)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The daemon owns SIGTERM/SIGINT/SIGHUP: never touch them, whatever thread this runs in.
        yield


class ApiServer:
    """uvicorn serving `app` on `listen` (``"127.0.0.1:8080"``, ``"[::1]:0"``, ...) in a background thread."""

    def __init__(self, app: Any, listen: str = "127.0.0.1:8080", *, graceful_timeout: float = 5.0) -> None:
        self.app = app
        self.listen = listen
        self.host, self._requested_port = parse_listen(listen)
        self._graceful_timeout = graceful_timeout
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._error: BaseException | None = None
        self.port: int = self._requested_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _bind(self) -> socket.socket:
        infos = socket.getaddrinfo(
            self.host or None, self._requested_port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        if not infos:
            raise OSError(f"cannot resolve {self.host!r}")
        family, kind, proto, _name, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def start(self, timeout: float = 10.0) -> int:
        """Bind, start serving, wait until ready; returns the bound port. Raises OSError / RuntimeError."""
        if self._thread is not None:
            raise RuntimeError("ApiServer already started")
        sock = self._bind()
        self._socket = sock
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=int(max(1, self._graceful_timeout)),
            timeout_keep_alive=30,
        )
        server = _Server(config)
        self._server = server

        def run() -> None:
            try:
                server.run(sockets=[sock])
            except BaseException as exc:  # SystemExit from a failed startup included
                self._error = exc

        thread = threading.Thread(target=run, name="api-server", daemon=True)
        self._thread = thread
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive():
                self._close_socket()
                raise RuntimeError(f"the HTTP API did not start: {self._error!r}")
            if time.monotonic() > deadline:
                self.stop(timeout=1.0)
                raise RuntimeError(f"the HTTP API did not start within {timeout} s")
            time.sleep(0.005)
        log.debug("http.listening", url=self.url)
        return self.port

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop serving (graceful first, forced after half of `timeout`); True when the thread has ended."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            self._close_socket()
            return True
        server.should_exit = True
        thread.join(timeout / 2)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout / 2)
        self._close_socket()
        stopped = not thread.is_alive()
        if not stopped:
            log.warning("http.stop_timeout", timeout=timeout)
        else:
            log.info("http.stopped")
        return stopped

    def _close_socket(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.close()
            self._socket = None

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def build_server(core: Core, health: HealthState, *, listen: str | None = None) -> ApiServer:
    """The API server of a daemon core (not started): authenticator, app and listener from ``daemon.http``.

    Raises `ConfigError` (exit 78) for an unusable ``daemon.http`` (``none`` off loopback, no token file, ...).
    """
    from cscs_storage_daemon.api.app import create_app
    from cscs_storage_daemon.api.auth import build_authenticator
    from cscs_storage_daemon.config import render_effective_config

    config = core.config
    http = config.daemon.http
    address = listen or http.listen
    authenticator = build_authenticator(http, listen=address)
    runtimes = {runtime.slug: runtime for runtime in core.offerings}

    def offering_details(slug: str) -> dict[str, Any]:
        runtime = runtimes[slug]
        return runtime.gateway.get_offering(runtime.uuid)

    app = create_app(
        offerings=[
            (runtime.slug, runtime.mirror, offering_config)
            for runtime, offering_config in zip(core.offerings, config.offerings, strict=True)
        ],
        health=health,
        metrics=core.metrics,
        auth=authenticator,
        offering_details=offering_details,
        render_config=lambda: render_effective_config(core.config),
        healthz_broker_grace=config.daemon.healthz_broker_grace,
    )
    return ApiServer(app, address)
