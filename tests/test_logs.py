"""Structured logs (events spec §7): JSON lines with stable fields, bound ids, and no secret ever shown."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any

import pytest
import structlog

from cscs_storage_daemon import logs

TOKEN = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b"
PASSWORD = "s3cr3t-rabbit"


class Output:
    def __init__(self) -> None:
        self.stream = io.StringIO()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]

    def text(self) -> str:
        return self.stream.getvalue()


@pytest.fixture
def output(monkeypatch: pytest.MonkeyPatch) -> Iterator[Output]:
    monkeypatch.setattr(logs, "_secrets", set())  # secrets registered here stay here
    out = Output()
    logs.configure(level="debug", fmt="json", stream=out.stream)
    structlog.contextvars.clear_contextvars()
    yield out
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


def test_json_lines_with_event_level_timestamp(output: Output) -> None:
    log = logs.get_logger("test")
    log.info("snapshot.written", offering="capstor", resources=3)
    log.warning("waldur.retry", attempt=2)
    first, second = output.lines()
    assert first["event"] == "snapshot.written"
    assert first["level"] == "info"
    assert first["offering"] == "capstor" and first["resources"] == 3
    assert datetime.fromisoformat(first["timestamp"].replace("Z", "+00:00")).utcoffset() is not None
    assert second["event"] == "waldur.retry" and second["level"] == "warning"
    assert output.text().count("\n") == 2  # one object per line


def test_level_filter(output: Output) -> None:
    logs.configure(level="warning", fmt="json", stream=output.stream)
    log = logs.get_logger()
    log.debug("a")
    log.info("b")
    log.warning("c")
    log.error("d")
    assert [line["event"] for line in output.lines()] == ["c", "d"]


def test_auto_format_is_json_when_not_a_tty(output: Output) -> None:
    logs.configure(level="info", fmt="auto", stream=output.stream)
    logs.get_logger().info("daemon.ready")
    assert output.lines()[0]["event"] == "daemon.ready"


def test_console_format(output: Output) -> None:
    logs.configure(level="info", fmt="console", stream=output.stream)
    logs.get_logger().info("daemon.ready", offerings=2)
    text = output.text()
    assert "daemon.ready" in text and "offerings=2" in text
    assert not text.startswith("{")


def test_bound_contextvars_appear(output: Output) -> None:
    log = logs.get_logger()
    structlog.contextvars.bind_contextvars(
        event_id="42", object_type="order", order_uuid="0a1b2c3d4e5f40718293a4b5c6d7e8f9"
    )
    log.info("order.file_written", file="x.json")
    structlog.contextvars.clear_contextvars()
    log.info("daemon.idle")
    bound, unbound = output.lines()
    assert bound["event_id"] == "42"
    assert bound["object_type"] == "order"
    assert bound["order_uuid"] == "0a1b2c3d4e5f40718293a4b5c6d7e8f9"
    assert bound["file"] == "x.json"
    assert "event_id" not in unbound


def test_secret_is_masked_everywhere(output: Output) -> None:
    logs.register_secret(TOKEN)
    logs.register_secret(PASSWORD)
    structlog.contextvars.bind_contextvars(request=f"GET /api/?token={TOKEN}")
    log = logs.get_logger()
    log.info(
        f"waldur.request with {TOKEN}",
        value=TOKEN,
        url=f"https://waldur.example.com/api/?token={TOKEN}",
        nested={"a": {"b": [f"x{TOKEN}y", {"c": PASSWORD}]}, "n": 1},
        items=(TOKEN, 3, None),
        error=RuntimeError(f"login refused for {PASSWORD}"),
    )
    try:
        raise ConnectionError(f"broker said no to {PASSWORD} / {TOKEN}")
    except ConnectionError:
        log.exception("broker.disconnected")
    text = output.text()
    assert TOKEN not in text
    assert PASSWORD not in text
    first, second = output.lines()
    assert first["event"] == "waldur.request with ***"
    assert first["value"] == "***"
    assert first["url"] == "https://waldur.example.com/api/?token=***"
    assert first["nested"] == {"a": {"b": ["x***y", {"c": "***"}]}, "n": 1}
    assert first["items"] == ["***", 3, None]
    assert first["error"] == "RuntimeError: login refused for ***"
    assert first["request"] == "GET /api/?token=***"
    assert "broker said no to *** / ***" in second["exception"]
    assert "ConnectionError" in second["exception"]


class Credentials:
    def __repr__(self) -> str:
        return f"Credentials(token={TOKEN!r})"


def test_secret_in_other_values_and_keys_is_masked(output: Output) -> None:
    """Values JSON cannot show as they are (rendered through repr) and dict keys are covered too."""
    logs.register_secret(TOKEN)
    logs.get_logger().info(
        "config.loaded",
        creds=Credentials(),
        raw=TOKEN.encode(),
        names={TOKEN},
        by_token={TOKEN: "user"},
        path=PurePosixPath("/etc/waldur") / TOKEN,
    )
    assert TOKEN not in output.text()
    line = output.lines()[0]
    assert line["by_token"] == {"***": "user"}
    assert line["creds"] == "Credentials(token='***')"


def test_short_or_empty_secrets_are_not_registered(output: Output) -> None:
    logs.register_secret(None)
    logs.register_secret("")
    logs.register_secret("abc")  # masking every "abc" would garble the logs
    logs.get_logger().info("x", value="abcdef")
    assert output.lines()[0]["value"] == "abcdef"


def test_non_secret_values_are_kept(output: Output) -> None:
    logs.register_secret(TOKEN)
    logs.get_logger().info("x", n=1, f=1.5, b=True, none=None, text="plain", nested={"k": [1, "v"]})
    line = output.lines()[0]
    assert (line["n"], line["f"], line["b"], line["none"], line["text"]) == (1, 1.5, True, None, "plain")
    assert line["nested"] == {"k": [1, "v"]}


def test_authorization_headers_are_masked(output: Output) -> None:
    logs.get_logger().info(
        "waldur.request",
        headers={
            "Authorization": f"Token {TOKEN}",
            "passcode": PASSWORD,
            "Password": PASSWORD,
            "Accept": "application/json",
        },
    )
    assert TOKEN not in output.text() and PASSWORD not in output.text()
    assert output.lines()[0]["headers"] == {
        "Authorization": "***",
        "passcode": "***",
        "Password": "***",
        "Accept": "application/json",
    }
