"""`cscs-storage-daemon demo`: the README's first command, on a machine with no broker and no Waldur."""

from __future__ import annotations

import io
import json
import socket
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from cscs_storage_daemon.capture import FORMAT_VERSION
from cscs_storage_daemon.cli import main
from cscs_storage_daemon.demo import demo_capture, run_demo
from cscs_storage_daemon.replay import read_capture, replay

SYSTEMS = {"capstor", "vast", "iopsstor"}


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network at all except loopback listening: any outgoing connection fails the test."""
    real_connect = socket.socket.connect

    def refuse(self: socket.socket, address: Any) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
            raise AssertionError(f"the demo tried to connect to {address}")
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[1] in (5672, 61613, 15672, 15674, 1883):
            raise AssertionError(f"the demo tried to reach a broker at {address}")
        real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _is_loopback(address: Any) -> bool:
    return isinstance(address, tuple) and str(address[0]) in ("127.0.0.1", "::1", "localhost")


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("*/*")) if p.parent.name in SYSTEMS}


def test_the_bundled_capture_is_small_current_and_secret_free() -> None:
    capture = demo_capture()
    assert capture.is_file()
    assert capture.stat().st_size < 1_000_000
    records = read_capture(capture).records
    assert records[0].kind == "header" and all(r.data["v"] <= FORMAT_VERSION for r in records)
    for offering in records[0].data["config"]["offerings"]:
        assert offering["waldur_api_token"] == "***"
    assert "Authorization" not in capture.read_text()
    assert records[-1].kind == "end"


def test_demo_replays_the_story_into_the_output_directory(tmp_path: Path, offline: None) -> None:
    out = io.StringIO()
    assert run_demo(output_dir=str(tmp_path / "demo-output"), out=out) == 0
    written = files(tmp_path / "demo-output")
    names = sorted(written)
    assert {name.split("/")[0] for name in names} == SYSTEMS
    kinds = {name.rsplit("-", 1)[-1].split("_")[0] for name in names}
    assert kinds == {"all.json", "create", "update", "terminate"}
    text = out.getvalue()
    for name in names:
        assert name.split("/")[1] in text
    assert "1 order erred" in text and "1 malformed message dead-lettered" in text
    # The update order grew climate-runs to 50 TB; the terminate order marks its resource as going away.
    (update,) = [c for n, c in written.items() if "-update_" in n]
    resource = json.loads(update)["result"]["storageResources"][0]
    assert resource["mountPoint"]["default"].endswith("/climate-runs")
    assert next(q["quota"] for q in resource["quotas"] if q["type"] == "space") == 50.0
    (terminate,) = [c for n, c in written.items() if "-terminate_" in n]
    assert json.loads(terminate)["result"]["storageResources"][0]["status"] == "removing"


def test_demo_twice_gives_the_same_files_as_a_plain_replay(tmp_path: Path, offline: None) -> None:
    assert run_demo(output_dir=str(tmp_path / "demo"), out=io.StringIO()) == 0
    first = files(tmp_path / "demo")
    assert run_demo(output_dir=str(tmp_path / "demo"), out=io.StringIO()) == 0  # into the same directory again
    assert files(tmp_path / "demo") == first
    replay(demo_capture(), tmp_path / "plain")
    assert files(tmp_path / "plain") == first


def test_the_cli_demo_command(tmp_path: Path, offline: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--output-dir", str(tmp_path / "cli")]) == 0
    assert "Wrote into" in capsys.readouterr().out
    assert files(tmp_path / "cli")


def test_demo_serve_serves_the_http_api_over_the_result(tmp_path: Path, offline: None) -> None:
    stop = threading.Event()
    ready: list[str] = []
    result: list[int] = []

    def on_ready(url: str) -> None:
        ready.append(url)

    thread = threading.Thread(
        target=lambda: result.append(
            run_demo(
                output_dir=str(tmp_path / "served"),
                serve=True,
                listen="127.0.0.1:0",
                out=io.StringIO(),
                stop=stop,
                on_ready=on_ready,
            )
        ),
        daemon=True,
    )
    thread.start()
    try:
        for _ in range(600):
            if ready or not thread.is_alive():
                break
            threading.Event().wait(0.05)
        assert ready, "the API did not start"
        with httpx.Client(base_url=ready[0], timeout=10) as client:
            answer = client.get("/api/storage-resources/", params={"storage_system": "capstor"})
            assert answer.status_code == 200
            served = answer.json()["result"]["storageResources"]
            snapshot = next(
                c for n, c in files(tmp_path / "served").items() if n.startswith("capstor/") and "-all" in n
            )
            assert served == json.loads(snapshot)["result"]["storageResources"]
            assert client.get("/healthz").status_code == 200
    finally:
        stop.set()
        thread.join(15)
    assert result == [0]
