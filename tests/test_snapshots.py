"""all.json regeneration (events spec §4): names, content, debouncing, heartbeat, retention, failures."""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from structlog.testing import capture_logs

from cscs_storage_daemon.clock import Clock, FixedClock, SystemClock
from cscs_storage_daemon.debounce import DebounceRules
from cscs_storage_daemon.mapping import MappingSettings
from cscs_storage_daemon.metrics import Metrics
from cscs_storage_daemon.mirror import OfferingMirror
from cscs_storage_daemon.runtime import OfferingRuntime
from cscs_storage_daemon.snapshots import SnapshotScheduler
from cscs_storage_daemon.stamps import Stamps
from cscs_storage_daemon.writer import OutputWriter

GOLDEN: dict[str, Any] = json.loads(Path("/work/shared/golden/api/resource.json").read_text())
ZURICH = ZoneInfo("Europe/Zurich")
START = datetime(2025, 1, 15, 23, 30, 5, tzinfo=UTC)  # 00:30 on the 16th in Zurich
RULES = DebounceRules(quiet=2.0, max_wait=30.0, heartbeat=3600.0)
SLUG = "capstor"


def raw(n: int, **changes: Any) -> dict[str, Any]:
    resource = copy.deepcopy(GOLDEN)
    resource.update(uuid=f"{n:032x}", slug=f"res-{n}", name=f"res-{n}", state="OK", options={})
    resource.update(changes)
    return resource


def make_offering(directory: Path, *, retention: int = 1000) -> OfferingRuntime:
    return OfferingRuntime(
        uuid="8c2b5f0e7a1d4c3b9e6f1a2b3c4d5e6f",
        slug=SLUG,
        name="Capstor storage",
        settings=MappingSettings(),
        zone=ZURICH,
        snapshot_retention=retention,
        gateway=None,  # type: ignore[arg-type]  # the scheduler never talks to Waldur
        mirror=OfferingMirror(SLUG, MappingSettings()),
        writer=OutputWriter(directory),
    )


class Harness:
    def __init__(self, directory: Path, clock: Clock, rules: DebounceRules = RULES, retention: int = 1000) -> None:
        self.directory = directory
        self.clock = clock
        self.stamps_seen: list[tuple[str, str, datetime]] = []
        self.written: list[datetime] = []
        self.metrics = Metrics()
        self.offering = make_offering(directory, retention=retention)
        self.scheduler = SnapshotScheduler(
            [self.offering],
            rules=rules,
            stamps=Stamps(clock, lambda kind, key, reading: self.stamps_seen.append((kind, key, reading))),
            metrics=self.metrics,
            on_written=lambda _offering, reading: self.written.append(reading),
        )

    def files(self) -> list[str]:
        return sorted(p.name for p in self.directory.iterdir()) if self.directory.is_dir() else []

    def read(self, name: str) -> Any:
        return json.loads((self.directory / name).read_bytes())

    def write_failures(self) -> float:
        value = self.metrics.registry.get_sample_value("cscs_write_failures_total", {"kind": "snapshot"})
        return value or 0.0


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(START)


@pytest.fixture(params=[False, True], ids=["render-all", "keep-rendered"])
def harness(tmp_path: Path, clock: FixedClock, request: pytest.FixtureRequest) -> Iterator[Harness]:
    h = Harness(tmp_path / "out", clock)
    h.scheduler.keep_rendered = request.param
    yield h
    h.scheduler.stop(flush=False, timeout=5)


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------------- regenerate


def test_regenerate_writes_all_json_named_in_the_offerings_zone(harness: Harness) -> None:
    harness.offering.mirror.replace_all([raw(2), raw(1)])
    assert harness.scheduler.regenerate(harness.offering)
    assert harness.files() == ["2025-01-16-00-30-all.json"]
    document = harness.read("2025-01-16-00-30-all.json")
    assert document["meta"] == {"date": "2025-01-16T00:30:05+01:00", "appVersion": "1.4.0"}
    assert document["result"]["storageResources"] == harness.offering.mirror.storage_objects()
    assert document["result"]["paginate"] == {"current": 1, "limit": 2, "offset": 0, "pages": 1, "total": 2}
    raw_bytes = (harness.directory / "2025-01-16-00-30-all.json").read_bytes()
    assert raw_bytes.endswith(b"}\n") and b'\n  "status": "success",' in raw_bytes


def test_empty_mirror_writes_an_empty_feed(harness: Harness) -> None:
    assert harness.scheduler.regenerate(harness.offering)
    document = harness.read(harness.files()[0])
    assert document["result"]["storageResources"] == []
    assert document["result"]["paginate"]["limit"] == 1


def test_stamps_recorder_gets_the_reading_used(harness: Harness, clock: FixedClock) -> None:
    harness.scheduler.regenerate(harness.offering)
    assert harness.stamps_seen == [("snapshot", SLUG, START)]
    assert harness.written == [START]
    clock.advance(90)
    harness.offering.mirror.apply(raw(1))
    harness.scheduler.regenerate(harness.offering)
    assert harness.stamps_seen[-1] == ("snapshot", SLUG, clock.now())
    assert harness.read(harness.files()[-1])["meta"]["date"] == clock.now().astimezone(ZURICH).isoformat()


def test_unchanged_content_is_not_rewritten(harness: Harness, clock: FixedClock) -> None:
    harness.offering.mirror.apply(raw(1))
    assert harness.scheduler.regenerate(harness.offering)
    before = harness.files()
    clock.advance(120)
    harness.scheduler.changed(harness.offering)
    assert not harness.scheduler.regenerate(harness.offering)
    assert harness.files() == before
    assert not harness.scheduler.pending(SLUG)
    harness.offering.mirror.apply(raw(1, limits={"storage": 7}))
    clock.advance(60)
    assert harness.scheduler.regenerate(harness.offering)
    assert harness.files() == [*before, "2025-01-16-00-33-all.json"]


def test_force_writes_unchanged_content(harness: Harness, clock: FixedClock) -> None:
    harness.scheduler.regenerate(harness.offering)
    clock.advance(60)
    assert harness.scheduler.regenerate(harness.offering, force=True)
    assert len(harness.files()) == 2


def test_heartbeat_rewrites_unchanged_content(harness: Harness, clock: FixedClock) -> None:
    harness.offering.mirror.apply(raw(1))
    harness.scheduler.regenerate(harness.offering)
    clock.advance(3599)
    assert not harness.scheduler.regenerate(harness.offering)
    clock.advance(1)
    assert harness.scheduler.regenerate(harness.offering)
    assert harness.files() == ["2025-01-16-00-30-all.json", "2025-01-16-01-30-all.json"]
    first, second = (harness.read(name) for name in harness.files())
    assert first["result"] == second["result"]
    assert second["meta"]["date"] == "2025-01-16T01:30:05+01:00"


def test_a_second_write_in_the_same_minute_replaces_the_first(harness: Harness, clock: FixedClock) -> None:
    harness.offering.mirror.apply(raw(1))
    harness.scheduler.regenerate(harness.offering)
    clock.advance(30)
    harness.offering.mirror.apply(raw(2))
    harness.scheduler.regenerate(harness.offering)
    assert harness.files() == ["2025-01-16-00-30-all.json"]
    assert harness.read("2025-01-16-00-30-all.json")["result"]["paginate"]["total"] == 2


def test_retention_prunes_old_snapshots_and_keeps_order_files(tmp_path: Path, clock: FixedClock) -> None:
    h = Harness(tmp_path / "out", clock, retention=3)
    order_file = "2025-01-16-00-00-create_0a1b2c3d4e5f40718293a4b5c6d7e8f9.json"
    h.offering.writer.write(order_file, b"{}\n")
    for n in range(6):
        h.offering.mirror.apply(raw(n))
        h.scheduler.regenerate(h.offering)
        clock.advance(60)
    assert h.files() == [
        order_file,
        "2025-01-16-00-33-all.json",
        "2025-01-16-00-34-all.json",
        "2025-01-16-00-35-all.json",
    ]
    assert h.read("2025-01-16-00-35-all.json")["result"]["paginate"]["total"] == 6


def test_stop_flushes_a_pending_snapshot(harness: Harness) -> None:
    harness.offering.mirror.apply(raw(1))
    harness.scheduler.changed(harness.offering)
    assert harness.scheduler.pending(SLUG)
    harness.scheduler.stop(flush=True, timeout=5)
    assert harness.files() == ["2025-01-16-00-30-all.json"]
    assert not harness.scheduler.pending(SLUG)


def test_metrics_after_a_write(harness: Harness) -> None:
    harness.scheduler.regenerate(harness.offering)
    registry = harness.metrics.registry
    assert registry.get_sample_value("cscs_snapshots_written_total", {"offering": SLUG}) == 1.0
    assert registry.get_sample_value("cscs_last_snapshot_timestamp_seconds", {"offering": SLUG}) == START.timestamp()


def test_never_two_regenerations_of_one_offering_at_once(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    inside = 0
    most = 0
    lock = threading.Lock()
    real_write = harness.offering.writer.write

    def slow_write(name: str, data: bytes) -> Path:
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        time.sleep(0.01)
        with lock:
            inside -= 1
        return real_write(name, data)

    monkeypatch.setattr(harness.offering.writer, "write", slow_write)
    threads = [
        threading.Thread(target=harness.scheduler.regenerate, args=(harness.offering,), kwargs={"force": True})
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert harness.scheduler.writes == 8
    assert most == 1


# ---------------------------------------------------------------------------------------------------- failures


def test_write_failure_is_logged_and_retried_after_quiet(
    tmp_path: Path, clock: FixedClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The timer thread on a clock that only moves by hand: a failed write waits for `quiet`, then succeeds."""
    rules = DebounceRules(quiet=0.2, max_wait=1.0, heartbeat=3600.0)  # short real waits of the timer thread
    harness = Harness(tmp_path / "out", clock, rules=rules)
    attempts: list[str] = []
    real_write = harness.offering.writer.write
    broken = True

    def flaky_write(name: str, data: bytes) -> Path:
        attempts.append(name)
        if broken:
            raise OSError(28, "No space left on device")
        return real_write(name, data)

    monkeypatch.setattr(harness.offering.writer, "write", flaky_write)
    harness.offering.mirror.apply(raw(1))
    with capture_logs() as logs:
        harness.scheduler.start()
        harness.scheduler.changed(harness.offering)
        clock.advance(rules.quiet)  # the trailing edge
        wait_for(lambda: len(attempts) == 1)
        failures = [entry for entry in logs if entry["event"] == "snapshot.write_failed"]
        assert len(failures) == 1
        assert failures[0]["log_level"] == "error"
        assert failures[0]["offering"] == SLUG
        assert failures[0]["file"] == "2025-01-16-00-30-all.json"
        assert "No space left on device" in failures[0]["error"]
        assert harness.write_failures() == 1.0
        assert harness.scheduler.pending(SLUG)  # the change is not lost
        assert harness.files() == []

        time.sleep(0.5)  # the clock stands still: no retry, let alone a tight loop against the failing disk
        assert len(attempts) == 1

        broken = False
        clock.advance(rules.quiet)
        wait_for(lambda: harness.files() == ["2025-01-16-00-30-all.json"])
        harness.scheduler.stop(flush=False, timeout=5)
    assert len(attempts) == 2
    assert not harness.scheduler.pending(SLUG)
    assert harness.read("2025-01-16-00-30-all.json")["result"]["paginate"]["total"] == 1
    assert any(entry["event"] == "snapshot.written" for entry in logs)


def test_failed_heartbeat_is_retried(harness: Harness, clock: FixedClock, monkeypatch: pytest.MonkeyPatch) -> None:
    harness.scheduler.regenerate(harness.offering)
    real_write = harness.offering.writer.write

    def broken_write(name: str, data: bytes) -> Path:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(harness.offering.writer, "write", broken_write)
    clock.advance(3600)
    with capture_logs():
        assert not harness.scheduler.regenerate(harness.offering)
    assert harness.scheduler.pending(SLUG)
    monkeypatch.setattr(harness.offering.writer, "write", real_write)
    clock.advance(RULES.quiet)
    assert harness.scheduler.regenerate(harness.offering)
    assert len(harness.files()) == 2


# ---------------------------------------------------------------------------------------------------- the timer


def test_a_burst_of_changes_gives_a_few_writes(tmp_path: Path) -> None:
    """10 000 change notifications (with the mirror really changing) while the timer runs: a handful of files."""
    rules = DebounceRules(quiet=0.2, max_wait=1.0, heartbeat=3600.0)
    h = Harness(tmp_path / "out", SystemClock(), rules=rules)
    scheduler, offering = h.scheduler, h.offering
    offering.mirror.apply(raw(0))
    assert scheduler.regenerate(offering)
    scheduler.start()
    try:
        before = scheduler.writes
        for i in range(10_000):
            if i % 100 == 0:
                offering.mirror.apply(raw(i // 100))
            scheduler.changed(offering)

        def settled_on_the_final_content() -> bool:
            if scheduler.pending(SLUG):
                return False
            newest = h.read(h.files()[-1])
            return bool(newest["result"]["storageResources"] == offering.mirror.storage_objects())

        wait_for(settled_on_the_final_content)
        # The file is in place a moment before the scheduler counts it: wait for the count too.
        wait_for(lambda: scheduler.writes > before)
        time.sleep(0.5)
        settled = scheduler.writes
        burst_writes = settled - before
        assert 1 <= burst_writes <= 3
        assert scheduler.alive
    finally:
        scheduler.stop(flush=False, timeout=5)
    assert scheduler.writes == settled  # nothing more once settled
    newest = h.read(h.files()[-1])
    assert newest["result"]["storageResources"] == offering.mirror.storage_objects()
    assert newest["result"]["paginate"]["total"] == 100
