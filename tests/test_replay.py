"""Offline replay (events spec §6): the guarantees, each a test.

* replaying the capture of a live run gives the files the live run wrote (names and bytes): on the real RabbitMQ
  with the fake Waldur (``broker`` tests), and with deliveries handed straight to the daemon (the rest);
* replaying a capture twice gives byte-identical files;
* a torn last line is ignored with a warning; a corrupt line in the middle stops with its line number; a newer
  format version is refused;
* a capture never holds the token;
* a request the capture holds no answer for is an error naming the request and the capture line.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

import cscs_storage_daemon.wiring as wiring
from cscs_storage_daemon.config import Config, load_config
from cscs_storage_daemon.daemon import Daemon
from cscs_storage_daemon.replay import ReplayError, read_capture, replay, run_replay_command
from cscs_storage_daemon.sdnotify import Notifier
from cscs_storage_daemon.testing.fake_waldur import FakeWaldur
from cscs_storage_daemon.testing.publishers import publish_stomp_like_waldur
from cscs_storage_daemon.testing.sample_data import populate
from cscs_storage_daemon.transports.base import Delivery

SYSTEMS = ["capstor", "vast", "iopsstor"]


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def write_config(tmp_path: Path, fake: FakeWaldur, offerings: list[Any], **daemon: Any) -> Path:
    settings: dict[str, Any] = {
        "broker": {"protocol": "stomp", "host": "127.0.0.1", "port": 61613, "tls": False},
        "state_directory": str(tmp_path / "state"),
        "snapshot": {"quiet": 0.05, "max_wait": 0.3, "heartbeat": 3600},
        "retry": {"attempts": 4, "max_wait": 0.02, "total": 20, "timeout": 5},
        "http": {"enabled": False},
    }
    settings.update(daemon)
    data = {
        "offerings": [
            {
                "name": f"CSCS {o.slug}",
                "waldur_api_url": fake.url,
                "waldur_api_token": fake.token,
                "waldur_offering_uuid": o.uuid,
                "backend_type": "cscs-hpc-storage",
                "backend_settings": {"output_directory": str(tmp_path / "out" / o.slug)},
                "backend_components": {
                    "storage": {"measured_unit": "TB", "accounting_type": "limit", "label": "Storage", "unit_factor": 1}
                },
            }
            for o in offerings
        ],
        "daemon": settings,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def output_files(root: Path) -> dict[str, bytes]:
    """Every file of every offering directory under `root` (the replay's state directory left out)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.glob("*/*"))
        if p.is_file() and not p.parent.name.startswith(".") and not p.name.startswith(".")
    }


def assert_same_files(live: Path, replayed: Path) -> None:
    expected, got = output_files(live), output_files(replayed)
    assert sorted(got) == sorted(expected)
    for name, content in expected.items():
        assert got[name] == content, f"{name} differs"
    assert any(name.endswith("-all.json") for name in expected)


# --------------------------------------------------------------------------------------------------------------
# The daemon without a broker: `Daemon` as `run` starts it, but deliveries are handed to it directly.


@dataclass
class Recorded:
    fake: FakeWaldur
    offerings: list[Any]
    tmp: Path
    config_path: Path
    daemon: Daemon | None = None
    submit: Callable[[Delivery], None] | None = None
    sent: int = 0
    orders: list[str] = field(default_factory=list)

    @property
    def capture(self) -> Path:
        return self.tmp / "capture.jsonl"

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def start(self, config: Config | None = None, *, record: bool = True) -> Daemon:
        self.daemon = Daemon(
            config or load_config(self.config_path),
            record=str(self.capture) if record else None,
            notifier=Notifier(None),
        )
        self.daemon.start()
        return self.daemon

    def stop(self) -> None:
        assert self.daemon is not None
        self.settle()
        self.daemon.request_stop()
        self.daemon.shutdown()

    def deliver(self, offering: Any, body: bytes | str) -> None:
        assert self.daemon is not None and self.submit is not None
        sub = self.daemon.subscriptions[offering.slug][0]
        self.sent += 1
        data = body.encode() if isinstance(body, str) else body
        self.submit(
            Delivery(
                transport=f"test:{offering.slug}",
                destination=sub.destination,
                headers={"message-id": f"m-{self.sent}", "redelivered": "false"},
                body=data,
            )
        )

    def order(self, offering: Any, order_uuid: str, state: str = "pending-provider") -> None:
        self.orders.append(order_uuid)
        body = {"order_uuid": order_uuid, "order_state": state, "offering_uuid": offering.uuid, "object_type": "order"}
        self.deliver(offering, json.dumps(body))

    def resource(self, offering: Any, resource_uuid: str) -> None:
        body = {"resource_uuid": resource_uuid, "offering_uuid": offering.uuid, "object_type": "resource"}
        self.deliver(offering, json.dumps(body))

    def settle(self) -> None:
        daemon = self.daemon
        assert daemon is not None and daemon.core is not None
        core = daemon.core
        assert wait_until(
            lambda: core.dispatcher.in_flight == 0 and not any(core.scheduler.pending(o.slug) for o in core.offerings)
        )
        assert wait_until(lambda: all(self.fake.order_state(u) in ("done", "erred") for u in self.orders))


@pytest.fixture
def recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorded]:
    holder: dict[str, Recorded] = {}

    def connect_without_broker(daemon: Daemon, core: Any, recorder: Any = None) -> list[Any]:
        submit = core.dispatcher.submit
        if recorder is not None:
            submit = recorder.wrap_delivery(submit)
        for offering_config, offering in zip(core.config.offerings, core.offerings, strict=True):
            daemon.subscriptions[offering.slug] = wiring.register_offering(core, offering_config, offering)
        holder["r"].submit = submit
        return []

    monkeypatch.setattr(wiring, "connect_transports", connect_without_broker)
    with FakeWaldur(seed=5) as fake:
        population = populate(fake, SYSTEMS, n=4, seed=5)
        rec = Recorded(fake, population.offerings, tmp_path, write_config(tmp_path, fake, population.offerings))
        holder["r"] = rec
        yield rec
        if rec.daemon is not None and rec.daemon.core is not None and rec.daemon.recorder is not None:
            rec.daemon.request_stop()


def a_story(rec: Recorded) -> None:
    """Orders created, updated and terminated on the three systems, resource changes, an invalid resource, a
    malformed event and one of a type the daemon ignores."""
    fake = rec.fake
    for index, offering in enumerate(rec.offerings):
        resource, create = fake.order_new_resource(offering.uuid, slug=f"story-{offering.slug}")
        rec.order(offering, create["uuid"])
        rec.settle()
        update = fake.create_order(resource["uuid"], "Update", limits={"storage": 20 + index})
        rec.order(offering, update["uuid"])
        rec.settle()
        if index == 1:
            terminate = fake.create_order(resource["uuid"], "Terminate")
            rec.order(offering, terminate["uuid"])
            rec.settle()
    changed = fake.resource_uuids(rec.offerings[0].uuid)[0]
    fake.update_resource(changed, name="renamed by the story")
    rec.resource(rec.offerings[0], changed)
    _bad, bad_order = fake.order_new_resource(rec.offerings[2].uuid, slug="bad-perms", permissions="8888")
    rec.order(rec.offerings[2], bad_order["uuid"])
    rec.deliver(rec.offerings[1], b"\xff\xfe not even utf-8")
    rec.deliver(rec.offerings[1], json.dumps({"object_type": "user_role", "user_uuid": "a" * 32}))
    rec.settle()


@pytest.fixture
def story(recorded: Recorded) -> Recorded:
    recorded.start()
    a_story(recorded)
    recorded.stop()
    return recorded


def test_replay_writes_the_files_the_live_run_wrote(story: Recorded, tmp_path: Path) -> None:
    summary = replay(story.capture, tmp_path / "replayed")
    assert_same_files(story.out, tmp_path / "replayed")
    assert summary.events["order"] == 8 and summary.events["resource"] == 1
    assert summary.events["dead letter"] == 1 and summary.events["ignored user_role"] == 1
    assert summary.dead_letters == 1
    assert summary.orders["done"] == 7 and summary.orders["erred"] == 1
    assert len(summary.order_files) == 7
    assert summary.errors == ["1 order(s) erred"] and not summary.incomplete and not summary.warnings
    assert (tmp_path / "replayed" / ".replay-state" / "dead-letter.jsonl").exists()


def test_replaying_twice_gives_byte_identical_files(story: Recorded, tmp_path: Path) -> None:
    replay(story.capture, tmp_path / "one")
    replay(story.capture, tmp_path / "two")
    one, two = output_files(tmp_path / "one"), output_files(tmp_path / "two")
    assert one == two and one


def test_a_file_the_replay_cannot_write_stops_it_naming_the_file(story: Recorded, tmp_path: Path) -> None:
    # The files are written in the background: the failure must still stop the replay, name the file, and leave
    # no summary that looks like success.
    live = sorted(p.relative_to(story.out) for p in story.out.rglob("*create_*.json"))[0]
    blocker = tmp_path / "replayed" / live
    blocker.mkdir(parents=True)  # a directory where the order file must go: open() fails with EISDIR
    with pytest.raises(ReplayError, match=rf"could not write .*{live.name}"):
        replay(story.capture, tmp_path / "replayed")


def test_the_capture_never_holds_the_token(story: Recorded) -> None:
    text = story.capture.read_text()
    assert story.fake.token not in text
    assert "Authorization" not in text and "authorization" not in text
    assert "/api/marketplace-orders/" in text  # it did record the exchanges


def test_a_torn_last_line_is_ignored_with_a_warning(story: Recorded, tmp_path: Path) -> None:
    data = story.capture.read_bytes()
    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(data[: len(data) - 10])  # a crash in the middle of the last line
    summary = replay(torn, tmp_path / "replayed")
    assert any("last line is incomplete" in w for w in summary.warnings)
    assert_same_files(story.out, tmp_path / "replayed")


def test_blank_lines_are_skipped_and_line_numbers_kept(story: Recorded, tmp_path: Path) -> None:
    lines = story.capture.read_bytes().splitlines(keepends=True)
    spaced = tmp_path / "spaced.jsonl"
    spaced.write_bytes(b"".join([*lines[:5], b"\n", b"  \n", *lines[5:9], lines[9][:40] + b"\n", *lines[10:]]))
    with pytest.raises(ReplayError, match=r"spaced\.jsonl:12: corrupt record"):  # line 10 of the capture, 2 lower
        replay(spaced, tmp_path / "replayed")
    spaced.write_bytes(b"".join([*lines[:5], b"\n", b"  \n", *lines[5:], b"   "]))
    summary = replay(spaced, tmp_path / "replayed")
    assert not summary.warnings
    assert_same_files(story.out, tmp_path / "replayed")


def test_a_corrupt_line_in_the_middle_stops_with_its_line_number(story: Recorded, tmp_path: Path) -> None:
    lines = story.capture.read_bytes().splitlines(keepends=True)
    lines[9] = lines[9][:40] + b"\n"
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_bytes(b"".join(lines))
    with pytest.raises(ReplayError, match=r"corrupt\.jsonl:10: corrupt record"):
        replay(corrupt, tmp_path / "replayed")
    out, err = _Stream(), _Stream()
    code = run_replay_command(str(corrupt), output_dir=str(tmp_path / "cli"), out=out, err=err)
    assert code == 1 and "corrupt.jsonl:10" in err.text


def test_a_newer_format_version_is_a_clear_error(story: Recorded, tmp_path: Path) -> None:
    lines = story.capture.read_text().splitlines(keepends=True)
    record = json.loads(lines[3])
    record["v"] = 2
    lines[3] = json.dumps(record) + "\n"
    newer = tmp_path / "newer.jsonl"
    newer.write_text("".join(lines))
    with pytest.raises(ReplayError, match=r"newer.jsonl:4: capture format version 2 is newer than this daemon reads"):
        replay(newer, tmp_path / "replayed")


def test_a_request_with_no_recorded_answer_names_the_request_and_the_line(story: Recorded, tmp_path: Path) -> None:
    lines = story.capture.read_text().splitlines(keepends=True)
    records = [json.loads(line) for line in lines]
    # Remove the answer to the first order's set_state_done.
    victim = next(i for i, r in enumerate(records) if r["kind"] == "http" and r["path"].endswith("/set_state_done/"))
    task = records[victim]["task"]
    previous = max(i for i in range(victim) if records[i].get("task") == task and records[i]["kind"] == "http")
    del lines[victim]
    missing = tmp_path / "missing.jsonl"
    missing.write_text("".join(lines))
    with pytest.raises(ReplayError) as failure:
        replay(missing, tmp_path / "replayed")
    message = str(failure.value)
    assert f"no recorded answer for POST {records[victim]['path']}" in message
    assert f"previous exchange of that task is at line {previous + 1}" in message


def test_a_capture_cut_short_ends_the_tasks_it_cut(story: Recorded, tmp_path: Path) -> None:
    lines = story.capture.read_text().splitlines(keepends=True)
    records = [json.loads(line) for line in lines]
    approve = next(i for i, r in enumerate(records) if r["kind"] == "http" and "approve_by_provider" in r["path"])
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(lines[: approve + 1]))
    summary = replay(cut, tmp_path / "replayed")
    assert len(summary.incomplete) == 1 and "event of line" in summary.incomplete[0]


def test_cli_replay_prints_the_summary(story: Recorded, tmp_path: Path) -> None:
    out, err = _Stream(), _Stream()
    code = run_replay_command(str(story.capture), output_dir=str(tmp_path / "cli"), out=out, err=err)
    assert code == 0, err.text
    assert "events: 11 (1 dead letter, 1 ignored user_role, 8 order, 1 resource)" in out.text
    assert "order files: 7" in out.text and "dead letters: 1" in out.text and "errors: 1" in out.text


def test_config_override_replaces_the_recorded_configuration(story: Recorded, tmp_path: Path) -> None:
    data = yaml.safe_load(story.config_path.read_text())
    for offering in data["offerings"]:
        offering["backend_settings"]["inode_base_multiplier"] = 10
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump(data))
    out, err = _Stream(), _Stream()
    code = run_replay_command(
        str(story.capture), output_dir=str(tmp_path / "what-if"), config_path=str(override), out=out, err=err
    )
    assert code == 0, err.text
    live, what_if = output_files(story.out), output_files(tmp_path / "what-if")
    assert sorted(live) == sorted(what_if)  # the same files ...
    assert any(live[name] != what_if[name] for name in live)  # ... with other inode quotas


def test_retries_and_give_ups_are_replayed(recorded: Recorded, tmp_path: Path) -> None:
    fake = recorded.fake
    recorded.start()
    offering = recorded.offerings[0]
    _resource, first = fake.order_new_resource(offering.uuid, slug="flaky-1")
    fake.fail_next(503, "drop", 429)  # the next three requests fail, then Waldur answers again
    recorded.order(offering, first["uuid"])
    recorded.settle()
    _resource, second = fake.order_new_resource(offering.uuid, slug="flaky-2")
    fake.fail_next(503, 503, 503, 503)  # more than the 4 attempts: the event is deferred to a reconciliation
    recorded.deliver(offering, json.dumps({"order_uuid": second["uuid"], "object_type": "order"}))
    assert wait_until(lambda: fake.order_state(second["uuid"]) == "done")  # the early reconciliation did it
    recorded.orders.append(second["uuid"])
    recorded.stop()
    records = read_capture(recorded.capture).records
    assert (
        sum(1 for r in records if r.kind == "http" and (r.data.get("status") in (429, 503) or "error" in r.data)) == 7
    )
    summary = replay(recorded.capture, tmp_path / "replayed")
    assert_same_files(recorded.out, tmp_path / "replayed")
    assert not summary.errors and not summary.incomplete


def test_a_write_that_failed_live_fails_in_the_replay(
    recorded: Recorded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cscs_storage_daemon.writer import OutputWriter

    recorded.start()
    fake, offering = recorded.fake, recorded.offerings[1]
    _resource, order = fake.order_new_resource(offering.uuid, slug="disk-full")
    real_write = OutputWriter.write

    def full_disk(self: OutputWriter, name: str, data: bytes) -> Path:
        if order["uuid"] in name:
            raise OSError(28, "No space left on device")
        return real_write(self, name, data)

    monkeypatch.setattr(OutputWriter, "write", full_disk)
    assert recorded.daemon is not None and recorded.daemon.core is not None
    recorded.daemon.core.dispatcher.write_retry_delay = 0.0
    recorded.order(offering, order["uuid"])
    recorded.orders.remove(order["uuid"])  # it stays executing: the broker would redeliver it
    recorded.settle()
    recorded.stop()
    monkeypatch.setattr(OutputWriter, "write", real_write)
    summary = replay(recorded.capture, tmp_path / "replayed")
    assert_same_files(recorded.out, tmp_path / "replayed")
    assert "1 order write(s) failed" in summary.errors


def test_two_runs_appended_to_one_capture_replay_as_two_runs(recorded: Recorded, tmp_path: Path) -> None:
    fake, offering = recorded.fake, recorded.offerings[0]
    recorded.start()
    _resource, order = fake.order_new_resource(offering.uuid, slug="before-restart")
    recorded.order(offering, order["uuid"])
    recorded.stop()
    recorded.start()  # a restart, recording into the same file: the ledger keeps the first run's orders
    recorded.order(offering, order["uuid"], "executing")  # a redelivery: no second file
    _resource, other = fake.order_new_resource(offering.uuid, slug="after-restart")
    recorded.order(offering, other["uuid"])
    recorded.stop()
    summary = replay(recorded.capture, tmp_path / "replayed")
    assert summary.sessions == 2
    assert_same_files(recorded.out, tmp_path / "replayed")
    assert len(summary.order_files) == 2


def test_a_reload_is_replayed_where_it_happened(recorded: Recorded, tmp_path: Path) -> None:
    fake, offering = recorded.fake, recorded.offerings[0]
    daemon = recorded.start()
    data = yaml.safe_load(recorded.config_path.read_text())
    data["daemon"]["auto_approve"] = False
    recorded.config_path.write_text(yaml.safe_dump(data))
    daemon.reload()
    _resource, order = fake.order_new_resource(offering.uuid, slug="needs-approval")
    recorded.order(offering, order["uuid"])
    recorded.orders.remove(order["uuid"])  # stays pending-provider: auto_approve is off now
    recorded.settle()
    recorded.stop()
    summary = replay(recorded.capture, tmp_path / "replayed")
    assert_same_files(recorded.out, tmp_path / "replayed")
    assert summary.order_files == []


class _Stream:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


# --------------------------------------------------------------------------------------------------------------
# On the real RabbitMQ, with the fake Waldur provisioning it


@dataclass
class LiveRun:
    fake: FakeWaldur
    daemon: Daemon
    offerings: list[Any]
    orders: list[str] = field(default_factory=list)

    def publish(self, offering: Any, body: str | bytes) -> None:
        sub = self.daemon.subscriptions[offering.slug][0]
        publish_stomp_like_waldur("127.0.0.1", 61613, sub.vhost, "guest", "guest", sub.queue_name, body)

    def order(self, offering: Any, order_uuid: str, state: str = "pending-provider") -> None:
        self.orders.append(order_uuid)
        body = {"order_uuid": order_uuid, "order_state": state, "offering_uuid": offering.uuid, "object_type": "order"}
        self.publish(offering, json.dumps(body))

    def settled(self) -> bool:
        return all(self.fake.order_state(u) in ("done", "erred") for u in self.orders)


@pytest.fixture
def live_run(tmp_path: Path, brokers: Any) -> Iterator[LiveRun]:
    with FakeWaldur(provision_rabbitmq=True, seed=7) as fake:
        population = populate(fake, SYSTEMS, n=4, seed=7)
        config = load_config(write_config(tmp_path, fake, population.offerings))
        daemon = Daemon(config, record=str(tmp_path / "capture.jsonl"), notifier=Notifier(None))
        daemon.start()
        loop = threading.Thread(target=daemon.loop, daemon=True)
        loop.start()
        run = LiveRun(fake, daemon, population.offerings)
        try:
            yield run
        finally:
            daemon.request_stop()
            loop.join(10)
            daemon.shutdown()


@pytest.mark.broker
def test_live_run_on_rabbitmq_replays_to_the_same_files(live_run: LiveRun, tmp_path: Path) -> None:
    fake = live_run.fake
    capstor, vast, iopsstor = live_run.offerings
    for offering in (capstor, vast, iopsstor):
        resource, create = fake.order_new_resource(offering.uuid, slug=f"live-{offering.slug}")
        live_run.order(offering, create["uuid"])
        assert wait_until(live_run.settled)
        update = fake.create_order(resource["uuid"], "Update", limits={"storage": 64})
        live_run.order(offering, update["uuid"])
        assert wait_until(live_run.settled)
    terminate = fake.create_order(fake.resource_uuids(vast.uuid)[0], "Terminate")
    live_run.order(vast, terminate["uuid"])
    changed = fake.resource_uuids(capstor.uuid)[1]
    fake.update_resource(changed, name="changed live")
    live_run.publish(
        capstor, json.dumps({"resource_uuid": changed, "offering_uuid": capstor.uuid, "object_type": "resource"})
    )
    _bad, bad = fake.order_new_resource(iopsstor.uuid, slug="bad-perms", permissions="8888")
    live_run.order(iopsstor, bad["uuid"])
    live_run.publish(vast, b"not json at all")
    assert wait_until(live_run.settled)
    assert wait_until(lambda: (tmp_path / "state" / "dead-letter.jsonl").exists())
    time.sleep(0.5)  # let the debounced all.json follow
    live_run.daemon.request_stop()
    live_run.daemon.shutdown()

    capture = tmp_path / "capture.jsonl"
    summary = replay(capture, tmp_path / "replayed")
    assert_same_files(tmp_path / "out", tmp_path / "replayed")
    assert summary.events["order"] == 8 and summary.events["resource"] == 1 and summary.dead_letters == 1
    assert summary.orders["erred"] == 1 and not summary.incomplete
    replay(capture, tmp_path / "again")
    assert output_files(tmp_path / "replayed") == output_files(tmp_path / "again")
    text = capture.read_text()
    assert fake.token not in text and "Authorization" not in text


@pytest.mark.broker
def test_a_busy_live_run_with_a_flaky_waldur_replays_to_the_same_files(live_run: LiveRun, tmp_path: Path) -> None:
    """Events published all at once, four workers, slow and failing Waldur answers, the snapshot timer firing in
    the middle: the replay runs the same interleaving and writes the same files."""
    fake = live_run.fake
    fake.set_faults(slow_rate=0.4, delay=0.02, error_rate=0.08, exempt_paths=("/api/marketplace-site-agent",))
    bodies: list[tuple[Any, str | bytes]] = []
    for index in range(24):
        offering = live_run.offerings[index % 3]
        resource, order = fake.order_new_resource(offering.uuid, slug=f"busy-{index}")
        live_run.orders.append(order["uuid"])
        body = {"order_uuid": order["uuid"], "order_state": "pending-provider", "object_type": "order"}
        bodies.append((offering, json.dumps(body | {"offering_uuid": offering.uuid})))
        change = {"resource_uuid": resource["uuid"], "offering_uuid": offering.uuid, "object_type": "resource"}
        bodies.append((offering, json.dumps(change)))
    bodies.append((live_run.offerings[1], json.dumps({"object_type": "offering_resources_sync"})))
    with ThreadPoolExecutor(12) as pool:
        list(pool.map(lambda item: live_run.publish(*item), bodies))
    assert wait_until(live_run.settled, 120)
    core = live_run.daemon.core
    assert core is not None
    assert wait_until(lambda: core.dispatcher.in_flight == 0)
    time.sleep(0.5)
    live_run.daemon.request_stop()
    live_run.daemon.shutdown()
    summary = replay(tmp_path / "capture.jsonl", tmp_path / "replayed")
    assert_same_files(tmp_path / "out", tmp_path / "replayed")
    assert summary.event_count == len(bodies) and not summary.incomplete


def test_a_reconciliation_pass_stopped_by_sigterm_stops_at_the_same_order(recorded: Recorded, tmp_path: Path) -> None:
    fake, offering = recorded.fake, recorded.offerings[2]
    daemon = recorded.start()
    core = daemon.core
    assert core is not None
    waiting = [fake.order_new_resource(offering.uuid, slug=f"open-{i}")[1]["uuid"] for i in range(3)]
    handle_order = core.processor.handle_order

    def then_sigterm(*args: Any, **kwargs: Any) -> Any:
        outcome = handle_order(*args, **kwargs)
        core.reconciler.request_stop()  # SIGTERM while the pass is in its first order
        return outcome

    core.processor.handle_order = then_sigterm  # type: ignore[method-assign]
    recorded.deliver(offering, json.dumps({"object_type": "offering_resources_sync", "offering_uuid": offering.uuid}))
    assert wait_until(lambda: sum(fake.order_state(u) == "done" for u in waiting) == 1)
    recorded.stop()
    assert sorted(fake.order_state(u) for u in waiting) == ["done", "pending-provider", "pending-provider"]
    summary = replay(recorded.capture, tmp_path / "replayed")
    assert_same_files(recorded.out, tmp_path / "replayed")
    assert len(summary.order_files) == 1


def test_ledger_rows_from_before_the_capture_decide_as_they_did_live(recorded: Recorded, tmp_path: Path) -> None:
    """The daemon ran (unrecorded) before; recording starts after a restart and an old order is redelivered: the
    live run skips it on its ledger row, and so must the replay, which starts from an empty ledger."""
    fake, offering = recorded.fake, recorded.offerings[1]
    recorded.start(record=False)
    _resource, old = fake.order_new_resource(offering.uuid, slug="before-recording")
    recorded.order(offering, old["uuid"])
    recorded.stop()
    before = output_files(recorded.out)
    recorded.start()
    recorded.order(offering, old["uuid"], "executing")  # redelivered: already done, no Waldur call, no file
    _resource, new = fake.order_new_resource(offering.uuid, slug="while-recording")
    recorded.order(offering, new["uuid"])
    recorded.stop()
    kinds = [r.kind for r in read_capture(recorded.capture).records]
    assert kinds.count("ledger") == 1
    summary = replay(recorded.capture, tmp_path / "replayed")
    assert not summary.errors and not summary.incomplete
    live, replayed = output_files(recorded.out), output_files(tmp_path / "replayed")
    assert all(live[name] == data for name, data in replayed.items())  # every file the replay wrote, as live
    orders_while_recording = {name for name in live if name not in before and "-all" not in name}
    assert {name for name in replayed if "-all" not in name} == orders_while_recording
    assert len(orders_while_recording) == 1 and new["uuid"] in orders_while_recording.pop()


def test_a_capture_from_another_machine_replays_without_its_api_settings(story: Recorded, tmp_path: Path) -> None:
    """The recorded `daemon.http` (a token file, an OIDC issuer) is the live machine's: the replay needs neither."""
    lines = story.capture.read_text().splitlines(keepends=True)
    header = json.loads(lines[0])
    header["config"]["daemon"]["http"] = {
        "enabled": True,
        "listen": "0.0.0.0:8080",
        "auth": "token",
        "token_file": "/etc/cscs-storage-daemon/api-token-of-the-head-node",
    }
    lines[0] = json.dumps(header) + "\n"
    moved = tmp_path / "from-the-head-node.jsonl"
    moved.write_text("".join(lines))
    replay(moved, tmp_path / "replayed")
    assert_same_files(story.out, tmp_path / "replayed")


def test_legacy_event_mode_replays_too(recorded: Recorded, tmp_path: Path) -> None:
    """One queue per object type; the object type comes from the queue name, the body may lack it."""
    data = yaml.safe_load(recorded.config_path.read_text())
    data["daemon"]["event_mode"] = "legacy"
    recorded.config_path.write_text(yaml.safe_dump(data))
    daemon = recorded.start()
    fake, offering = recorded.fake, recorded.offerings[0]
    queues = {sub.object_type: sub for sub in daemon.subscriptions[offering.slug]}
    assert set(queues) == {"order", "resource", "offering_resources_sync"}
    assert recorded.submit is not None
    resource, order = fake.order_new_resource(offering.uuid, slug="legacy-store")
    recorded.orders.append(order["uuid"])
    for object_type, body in (
        ("order", {"order_uuid": order["uuid"], "order_state": "pending-provider"}),
        ("resource", {"resource_uuid": resource["uuid"]}),
    ):
        recorded.submit(
            Delivery(
                transport="test",
                destination=queues[object_type].destination,
                headers={"message-id": object_type},
                body=json.dumps(body).encode(),
            )
        )
        recorded.settle()
    recorded.stop()
    summary = replay(recorded.capture, tmp_path / "replayed")
    assert_same_files(recorded.out, tmp_path / "replayed")
    assert summary.events == {"order": 1, "resource": 1}


def test_buffers_are_written_whole_after_a_short_vectored_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cscs_storage_daemon import replay as replay_module

    buffers: list[bytes | memoryview] = [b"head", *(memoryview(b"x%04d," % i) for i in range(3000)), b"tail"]
    expected = b"".join(buffers)
    writev = os.writev

    def short_writev(fd: int, chunk: list[bytes | memoryview]) -> int:  # stops in the middle of the 7th buffer
        return writev(fd, [*chunk[:6], memoryview(chunk[6])[:3]])

    monkeypatch.setattr(replay_module.os, "writev", short_writev)
    target = tmp_path / "all.json"
    target.write_bytes(b"an older, longer file " * 2000)
    replay_module._write_in_place(target, buffers, 0o640)
    assert target.read_bytes() == expected
    assert (target.stat().st_mode & 0o777) == 0o640
