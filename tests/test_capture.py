"""The capture writer (events spec §6): record format, flushing, secrets, tasks, HTTP recording, appending."""

from __future__ import annotations

import base64
import json
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from cscs_storage_daemon.capture import (
    FORMAT_VERSION,
    CaptureWriter,
    body_key,
    decode_body,
    encode_body,
)
from cscs_storage_daemon.clock import FixedClock
from cscs_storage_daemon.config import Config, config_from_data
from cscs_storage_daemon.transports.base import Delivery

TOKEN = "0123456789abcdef0123456789abcdef01234567"
OFFERING = "c7a3d8f2b1e04f6a9d2c5b8e7f1a3c4d"


def make_config(tmp_path: Path, token: str = TOKEN) -> Config:
    return config_from_data(
        {
            "offerings": [
                {
                    "name": "CSCS capstor",
                    "waldur_api_url": "https://waldur.example.org/api/",
                    "waldur_api_token": token,
                    "waldur_offering_uuid": OFFERING,
                    "backend_type": "cscs-hpc-storage",
                    "backend_settings": {"output_directory": str(tmp_path / "out")},
                    "backend_components": {
                        "storage": {"measured_unit": "TB", "accounting_type": "limit", "label": "Storage"}
                    },
                }
            ],
            "daemon": {"state_directory": str(tmp_path / "state")},
        },
        source="test.yaml",
        expand_env=False,
    )


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def capture(tmp_path: Path) -> Any:
    path = tmp_path / "capture.jsonl"
    writer = CaptureWriter.open(path, make_config(tmp_path))
    yield writer, path
    writer.close()


def delivery(body: bytes, **headers: str) -> Delivery:
    return Delivery(
        transport="stomp:capstor",
        destination="/amq/queue/consumer_1",
        headers={"message-id": "m-1", "subscription": "0", **headers},
        body=body,
    )


def test_header_first_with_masked_config_and_version(capture: Any) -> None:
    _writer, path = capture
    (header,) = read(path)
    assert header["kind"] == "header"
    assert header["v"] == FORMAT_VERSION and header["seq"] == 0
    assert header["version"]
    assert header["config"]["offerings"][0]["waldur_api_token"] == "***"
    assert header["config"]["offerings"][0]["waldur_offering_uuid"] == OFFERING
    assert datetime.fromisoformat(header["time"]).utcoffset() is not None


def test_every_record_has_version_seq_time_kind_and_is_flushed_at_once(capture: Any) -> None:
    writer, path = capture
    writer.wrap_delivery(lambda _d: None)(delivery(b'{"object_type": "order"}'))
    # Read while the writer is open: the record is already in the file (a crash loses at most the last line).
    records = read(path)
    assert [r["kind"] for r in records] == ["header", "event"]
    assert [r["seq"] for r in records] == [0, 1]
    for record in records:
        assert record["v"] == FORMAT_VERSION
        assert datetime.fromisoformat(record["time"]).tzinfo is not None
    event = records[1]
    assert event["task"] == event["seq"]
    assert event["body"] == '{"object_type": "order"}' and event["body_encoding"] == "utf-8"
    assert event["transport"] == "stomp:capstor" and event["destination"] == "/amq/queue/consumer_1"
    assert event["headers"]["message-id"] == "m-1"


def test_a_body_that_is_not_utf8_is_base64(capture: Any) -> None:
    writer, path = capture
    raw = b"\xff\xfe\x00garbage"
    writer.record_event(delivery(raw))
    event = read(path)[-1]
    assert event["body_encoding"] == "base64"
    assert base64.b64decode(event["body"]) == raw
    assert decode_body(event["body"], event["body_encoding"]) == raw


def test_secret_looking_delivery_headers_are_not_recorded(capture: Any) -> None:
    writer, path = capture
    writer.record_event(delivery(b"{}", passcode="hunter2hunter2", Authorization="Basic abc"))
    headers = read(path)[-1]["headers"]
    assert "passcode" not in headers and "Authorization" not in headers


def test_the_token_never_reaches_the_file(tmp_path: Path) -> None:
    path = tmp_path / "capture.jsonl"
    writer = CaptureWriter.open(path, make_config(tmp_path))
    # The token turns up in an event body, a response body and an error message: all scrubbed.
    writer.record_event(delivery(f'{{"object_type": "order", "note": "{TOKEN}"}}'.encode()))

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["Authorization"] == f"Token {TOKEN}"
        if request.url.path.endswith("/boom/"):
            raise httpx.ConnectError(f"cannot connect with {TOKEN}")
        return httpx.Response(200, json={"echo": TOKEN}, headers={"X-Secret": TOKEN})

    transport = writer_transport(writer, handler)
    with httpx.Client(transport=transport, base_url="https://waldur.example.org") as client:
        client.get("/api/x/", headers={"Authorization": f"Token {TOKEN}"})
        with pytest.raises(httpx.ConnectError):
            client.get("/api/boom/", headers={"Authorization": f"Token {TOKEN}"})
    writer.close()
    text = path.read_text()
    assert TOKEN not in text
    assert "Authorization" not in text and "authorization" not in text
    answer = next(r for r in read(path) if r["kind"] == "http" and "status" in r)
    assert json.loads(answer["body"]) == {"echo": "***"}


def writer_transport(writer: CaptureWriter, handler: Any) -> httpx.BaseTransport:
    from cscs_storage_daemon.capture import RecordingTransport

    return RecordingTransport(httpx.MockTransport(handler), writer)


def test_http_exchanges_keep_what_replay_needs(capture: Any) -> None:
    writer, path = capture

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(201, json={"ok": True})
        return httpx.Response(
            200,
            json=[{"uuid": "a"}],
            headers={
                "X-Result-Count": "1",
                "Link": '<https://w/api/r/?page=2>; rel="next"',
                "Set-Cookie": "sessionid=x",
                "Server": "fake",
            },
        )

    with httpx.Client(transport=writer_transport(writer, handler), base_url="https://waldur.example.org") as client:
        answer = client.get("/api/marketplace-orders/", params={"offering_uuid": OFFERING, "state": ["a", "b"]})
        assert answer.json() == [{"uuid": "a"}] and answer.headers["x-result-count"] == "1"
        client.post("/api/marketplace-orders/1/set_state_erred/", json={"error_message": "bad"})
    get, post = read(path)[1:]
    assert get["kind"] == "http" and get["method"] == "GET"
    assert get["path"] == f"/api/marketplace-orders/?offering_uuid={OFFERING}&state=a&state=b"
    assert get["status"] == 200
    assert get["headers"] == {
        "content-type": "application/json",
        "link": '<https://w/api/r/?page=2>; rel="next"',
        "x-result-count": "1",
    }
    assert json.loads(get["body"]) == [{"uuid": "a"}]
    assert "request_body" not in get
    assert post["status"] == 201 and json.loads(post["request_body"]) == {"error_message": "bad"}


def test_transport_errors_are_recorded_then_raised(capture: Any) -> None:
    writer, path = capture

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with httpx.Client(transport=writer_transport(writer, handler), base_url="https://w") as client:
        with pytest.raises(httpx.ReadTimeout):
            client.get("/api/orders/1/")
    record = read(path)[-1]
    assert record["kind"] == "http" and record["error"] == "ReadTimeout" and "status" not in record


def test_stamps_record_the_reading_used(capture: Any) -> None:
    writer, path = capture
    moment = datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)
    stamps = writer.stamps(FixedClock(moment))
    with writer.task("snapshot", offering="capstor"):
        assert stamps.for_snapshot("capstor") == moment
        with stamps.section():
            assert stamps.for_order("a" * 32) == moment
    task, snap, order, done = read(path)[1:]
    assert task["kind"] == "task" and task["run"] == "snapshot" and task["offering"] == "capstor"
    assert snap == {**snap, "kind": "stamp", "stamp": "snapshot", "key": "capstor", "task": task["seq"]}
    assert datetime.fromisoformat(snap["reading"]) == moment
    assert order["stamp"] == "order" and order["key"] == "a" * 32
    assert done["kind"] == "done" and done["task"] == task["seq"]


def test_nested_tasks_belong_to_the_outer_one(capture: Any) -> None:
    writer, path = capture
    with writer.task("start"):
        with writer.task("reconcile", offering="capstor", reason="start"):
            writer.record_stamp("order", "b" * 32, datetime.now(UTC))
    start, stamp, done = read(path)[1:]
    assert start["run"] == "start" and stamp["task"] == start["seq"] and done["task"] == start["seq"]


def test_an_event_scope_tags_the_handling_of_a_recorded_delivery(capture: Any) -> None:
    writer, path = capture
    handled: list[Delivery] = []
    submit = writer.wrap_delivery(handled.append)
    first = delivery(b'{"object_type": "resource"}')
    submit(first)

    def work() -> None:
        with writer.event_scope(first):
            writer.record_stamp("order", "c" * 32, datetime.now(UTC))

    thread = threading.Thread(target=work)  # a worker thread, as in the daemon
    thread.start()
    thread.join()
    event, stamp, done = read(path)[1:]
    assert handled == [first]
    assert stamp["task"] == event["seq"] and done == {**done, "kind": "done", "task": event["seq"]}


def test_records_outside_any_task_carry_no_task(capture: Any) -> None:
    writer, path = capture
    writer.record_stamp("order", "d" * 32, datetime.now(UTC))
    assert "task" not in read(path)[-1]


def test_parallel_writers_give_whole_lines_in_seq_order(capture: Any) -> None:
    writer, path = capture

    def spam(n: int) -> None:
        for i in range(200):
            writer.record_event(delivery(f'{{"n": {n}, "i": {i}}}'.encode()))

    threads = [threading.Thread(target=spam, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    records = read(path)
    assert len(records) == 1 + 8 * 200
    assert [r["seq"] for r in records] == list(range(len(records)))


def test_close_writes_end_and_drops_later_records(tmp_path: Path) -> None:
    path = tmp_path / "capture.jsonl"
    writer = CaptureWriter.open(path, make_config(tmp_path))
    writer.close()
    writer.record_event(delivery(b"{}"))  # a worker still running after the stop: ignored
    writer.close()
    assert [r["kind"] for r in read(path)] == ["header", "end"]


def test_appending_continues_the_numbering_and_cuts_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "capture.jsonl"
    first = CaptureWriter.open(path, make_config(tmp_path))
    first.record_event(delivery(b"{}"))
    first.close()
    with open(path, "ab") as handle:
        handle.write(b'{"v": 1, "seq": 3, "kind": "ev')  # a crash in the middle of a line
    second = CaptureWriter.open(path, make_config(tmp_path))
    second.close()
    records = read(path)  # every line parses again
    assert [r["kind"] for r in records] == ["header", "event", "end", "header", "end"]
    assert [r["seq"] for r in records] == [0, 1, 2, 3, 4]


def test_body_keys_ignore_volatile_fields_and_key_order() -> None:
    a = json.dumps({"name": "x", "offering": "o", "last_restarted": "2026-01-01T00:00:00Z"}).encode()
    b = json.dumps({"offering": "o", "last_restarted": "2027-01-01T00:00:00Z", "name": "x"}).encode()
    assert body_key(a) == body_key(b)
    assert body_key(b"") == ""
    assert body_key(b'{"name": "y"}') != body_key(a)
    assert encode_body("é".encode()) == ("é", "utf-8")


def test_a_capture_that_cannot_be_written_stops_recording_and_never_raises(tmp_path: Path) -> None:
    path = tmp_path / "capture.jsonl"
    writer = CaptureWriter.open(path, make_config(tmp_path))

    class FullDisk:
        closed = False

        def write(self, _data: bytes) -> int:
            raise OSError(28, "No space left on device")

        def flush(self) -> None:
            pass

        def fileno(self) -> int:
            return -1

        def close(self) -> None:
            self.closed = True

    writer._handle = FullDisk()
    handled: list[Delivery] = []
    writer.wrap_delivery(handled.append)(delivery(b"{}"))  # recorded nothing, handed on all the same
    assert handled and writer.record_event(delivery(b"{}")) == -1
    writer.close()
    assert [r["kind"] for r in read(path)] == ["header"]
