"""structlog set-up: JSON lines when stdout is not a TTY, a console renderer when it is.

Every processor is a plain function. `redact_secrets` is the last line of defence: any registered secret that
made its way into a log value is replaced by `***` before rendering.

A line costs a few microseconds, a handful per order: one logger writes every line (structlog's factory would build
a `PrintLogger` per call, as loggers are not cached: tests reconfigure), one JSON encoder renders them (what
`json.dumps` with a ``default`` builds per call) and a line of plain values with no secret in it is checked in one
pass rather than value by value.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

_secrets: set[str] = set()
_secrets_lock = threading.Lock()
MASK = "***"


def register_secret(value: str | None) -> None:
    """Remember a secret (token, password) so that no log line ever shows it."""
    if value and len(value) >= 4:
        with _secrets_lock:
            _secrets.add(value)


def redact(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {(redact(k) if isinstance(k, str) else k): _redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact_value(v) for v in value]
    if isinstance(value, BaseException):
        return redact(f"{type(value).__name__}: {value}")
    if value is None or isinstance(value, (bool, int, float)):
        return value
    # Anything else (bytes, sets, URLs, models, ...) is rendered through repr(): redact that rendering.
    shown = repr(value)
    hidden = redact(shown)
    return hidden if hidden != shown else value


_PLAIN = (str, bool, int, float, type(None))
_SEPARATOR = "\x00"


def _holds_no_secret(event_dict: MutableMapping[str, Any]) -> bool:
    """True when every value is a plain one (strings, numbers, None) and no string holds a secret: nothing to redact.
    The strings are joined with a separator no secret contains, so a secret is found in the join only if it is in a
    value."""
    texts = []
    for value in event_dict.values():
        if isinstance(value, str):
            texts.append(value)
        elif not isinstance(value, _PLAIN):
            return False
    joined = _SEPARATOR.join(texts)
    return not any(secret in joined or _SEPARATOR in secret for secret in _secrets)


def redact_secrets(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if not _secrets or _holds_no_secret(event_dict):
        return event_dict
    for key, value in list(event_dict.items()):
        event_dict[key] = _redact_value(value)
    return event_dict


def drop_authorization(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Headers must never be logged whole; if one slips in, its Authorization value goes."""
    headers = event_dict.get("headers")
    if isinstance(headers, dict):
        hidden = {"authorization", "passcode", "password"}
        event_dict["headers"] = {k: (MASK if k.lower() in hidden else v) for k, v in headers.items()}
    return event_dict


class _StandardStream:
    """`sys.stdout` / `sys.stderr` looked up at each write, never bound once: whoever swaps them (a test runner's
    capture, a daemoniser) must not leave the logger holding a closed file. A log line that cannot be written is
    dropped; logging never raises into the thread that logs."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _stream(self) -> TextIO:
        stream: TextIO = getattr(sys, self.name)
        return stream

    def write(self, text: str) -> int:
        try:
            return self._stream().write(text)
        except (ValueError, OSError):
            return 0

    def flush(self) -> None:
        try:
            self._stream().flush()
        except (ValueError, OSError):
            pass

    def isatty(self) -> bool:
        try:
            return self._stream().isatty()
        except (ValueError, OSError):
            return False


#: `structlog.processors.JSONRenderer(sort_keys=False)`'s output, from one encoder instead of one per line.
_JSON = json.JSONEncoder(default=structlog.processors._json_fallback_handler)


def render_json(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> str:
    return _JSON.encode(event_dict)


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog for the process. `fmt` is `auto`, `json` or `console`; `stream` defaults to stdout."""
    out: Any = stream if stream is not None else sys.stdout
    if out is sys.stdout or out is sys.__stdout__:
        out = _StandardStream("stdout")
    elif out is sys.stderr or out is sys.__stderr__:
        out = _StandardStream("stderr")
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    renderer: Any = structlog.dev.ConsoleRenderer(colors=False) if use_console else render_json
    printer = structlog.PrintLogger(file=out)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            drop_authorization,
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=lambda *_args: printer,
        cache_logger_on_first_use=False,
    )


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name) if name else structlog.get_logger()
