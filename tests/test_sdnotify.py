"""sd_notify over a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cscs_storage_daemon.sdnotify import Notifier


class FakeSystemd:
    def __init__(self, bind_to: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)
        self.sock.settimeout(5.0)

    def receive(self) -> str:
        return self.sock.recv(4096).decode("utf-8")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSystemd]:
    path = str(tmp_path / "notify")
    assert len(path) < 100  # sun_path limit
    server = FakeSystemd(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield server
    server.close()


@pytest.fixture
def systemd_abstract(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSystemd]:
    name = f"cscs-test-notify-{uuid.uuid4().hex}"
    server = FakeSystemd("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    yield server
    server.close()


@pytest.mark.parametrize("fixture", ["systemd_path", "systemd_abstract"])
def test_lifecycle_messages_arrive(fixture: str, request: pytest.FixtureRequest) -> None:
    systemd: FakeSystemd = request.getfixturevalue(fixture)
    notifier = Notifier()
    assert notifier.enabled
    assert notifier.ready()
    assert systemd.receive() == "READY=1"
    assert notifier.watchdog()
    assert systemd.receive() == "WATCHDOG=1"
    assert notifier.reloading()
    assert systemd.receive() == "RELOADING=1"
    assert notifier.stopping()
    assert systemd.receive() == "STOPPING=1"


def test_ready_with_status(systemd_path: FakeSystemd) -> None:
    assert Notifier().ready("2 offerings, 1234 resources")
    assert systemd_path.receive() == "READY=1\nSTATUS=2 offerings, 1234 resources"


def test_explicit_address_wins_over_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "elsewhere"))
    server = FakeSystemd(str(tmp_path / "mine"))
    try:
        assert Notifier(str(tmp_path / "mine")).watchdog()
        assert server.receive() == "WATCHDOG=1"
    finally:
        server.close()


@pytest.mark.parametrize("value", [None, ""])
def test_disabled_when_unset(value: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if value is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
    notifier = Notifier()
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()
    assert not notifier.stopping()


def test_no_listener_is_not_an_error(tmp_path: Path) -> None:
    """systemd gone (or a stale variable): the daemon carries on."""
    notifier = Notifier(str(tmp_path / "nobody-listens"))
    assert notifier.enabled
    assert not notifier.ready()
    assert not Notifier("@cscs-test-nobody-" + uuid.uuid4().hex).watchdog()


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),  # WatchdogSec=30 → ping every 15 s
        ("30000000", "self", 15.0),
        ("30000000", "other", None),  # the watchdog is meant for another process
        ("100", None, 0.5),  # never a busy loop
        ("", None, None),
        (None, None, None),
        ("soon", None, None),
    ],
)
def test_watchdog_interval(
    usec: str | None, pid: str | None, expected: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if usec is None:
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is None:
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() if pid == "self" else os.getpid() + 1))
    assert Notifier("/nonexistent").watchdog_interval() == expected


def test_a_listener_that_never_reads_cannot_block_the_daemon(tmp_path: Path) -> None:
    """systemd always reads; a stuck listener must cost a dropped notification, not a frozen main loop."""
    import threading

    path = tmp_path / "full.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        notifier = Notifier(str(path))
        results: list[bool] = []
        worker = threading.Thread(target=lambda: results.extend(notifier.watchdog() for _ in range(5000)))
        worker.start()
        worker.join(30)
        assert not worker.is_alive()
        assert results[0] is True and results[-1] is False
