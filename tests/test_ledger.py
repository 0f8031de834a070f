"""The order ledger (events spec §2): one file per order, and only the missing step repeated."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from cscs_storage_daemon.ledger import Ledger, MemoryLedger, OrderLedger, OrderRecord

ORDER = "0a1b2c3d4e5f40718293a4b5c6d7e8f9"
RESOURCE = "6a7b8c9d0e1f4cd74859a0b1c2d3e4f5"
FIRST_NAME = f"2025-03-14-09-26-create_{ORDER}.json"
LATER_NAME = f"2025-03-14-09-31-create_{ORDER}.json"


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    led = Ledger(tmp_path / "state" / "ledger.sqlite3")
    yield led
    led.close()


@pytest.fixture(params=["sqlite", "memory"])
def any_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OrderLedger]:
    """The rules hold for both: the daemon's SQLite ledger and the replay's `MemoryLedger`."""
    led: OrderLedger = Ledger(tmp_path / "ledger.sqlite3") if request.param == "sqlite" else MemoryLedger()
    yield led
    led.close()


def intent(led: OrderLedger, order: str = ORDER, name: str = FIRST_NAME) -> str:
    return led.record_intent(order, order_type="create", offering="capstor", resource_uuid=RESOURCE, file_name=name)


def test_unknown_order(any_ledger: OrderLedger) -> None:
    ledger = any_ledger
    assert ledger.get(ORDER) is None
    assert ledger.count() == 0


def test_lifecycle_intent_written_completed(any_ledger: OrderLedger) -> None:
    ledger = any_ledger
    assert intent(ledger) == FIRST_NAME
    record = ledger.get(ORDER)
    assert record == OrderRecord(ORDER, "create", "capstor", RESOURCE, FIRST_NAME, None, None, None)
    assert not record.written and not record.completed

    ledger.record_written(ORDER, at="2025-03-14T09:26:53+00:00")
    record = ledger.get(ORDER)
    assert record is not None
    assert record.written and not record.completed
    assert record.written_at == "2025-03-14T09:26:53+00:00"

    ledger.record_completed(ORDER, order_type="create", offering="capstor", outcome="done", at="2025-03-14T09:26:54Z")
    record = ledger.get(ORDER)
    assert record is not None
    assert record.written and record.completed
    assert record.outcome == "done"
    assert record.completed_at == "2025-03-14T09:26:54Z"
    assert record.file_name == FIRST_NAME  # completing does not forget the file
    assert ledger.count() == 1


def test_a_second_intent_keeps_the_reserved_name(any_ledger: OrderLedger) -> None:
    """A retry a few minutes later would compute another name; the first one is reused: no second file."""
    ledger = any_ledger
    assert intent(ledger) == FIRST_NAME
    assert intent(ledger, name=LATER_NAME) == FIRST_NAME
    ledger.record_written(ORDER, at="2025-03-14T09:26:53+00:00")
    assert intent(ledger, name=LATER_NAME) == FIRST_NAME
    record = ledger.get(ORDER)
    assert record is not None
    assert record.file_name == FIRST_NAME
    assert record.written_at == "2025-03-14T09:26:53+00:00"  # a new intent does not undo the written step
    assert ledger.count() == 1


def test_completed_without_a_file(any_ledger: OrderLedger) -> None:
    """An order erred for an invalid resource: completed, no file."""
    ledger = any_ledger
    ledger.record_completed(ORDER, order_type="update", offering="capstor", outcome="erred", at="t")
    record = ledger.get(ORDER)
    assert record is not None
    assert record.completed and not record.written
    assert record.file_name is None
    assert record.outcome == "erred"


def test_orders_are_independent(any_ledger: OrderLedger) -> None:
    ledger = any_ledger
    other = "1b2c3d4e5f6a47829304b5c6d7e8f9a0"
    intent(ledger)
    intent(ledger, order=other, name=f"2025-03-14-09-27-create_{other}.json")
    ledger.record_written(other, at="t")
    first, second = ledger.get(ORDER), ledger.get(other)
    assert first is not None and second is not None
    assert not first.written and second.written
    assert ledger.count() == 2


def test_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    led = Ledger(path)
    intent(led)
    led.record_written(ORDER, at="2025-03-14T09:26:53+00:00")
    led.close()

    reopened = Ledger(path)
    try:
        record = reopened.get(ORDER)
        assert record is not None
        assert record.file_name == FIRST_NAME and record.written and not record.completed
        # after a restart the redelivered order still gets the name reserved before the restart
        assert intent(reopened, name=LATER_NAME) == FIRST_NAME
        reopened.record_completed(ORDER, order_type="create", offering="capstor", outcome="done", at="t")
    finally:
        reopened.close()

    again = Ledger(path)
    try:
        record = again.get(ORDER)
        assert record is not None and record.completed
    finally:
        again.close()


def test_state_directory_is_created(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "ledger.sqlite3"
    Ledger(path).close()
    assert path.is_file()


def test_in_memory() -> None:
    led = Ledger(":memory:")
    try:
        assert intent(led) == FIRST_NAME
        assert led.count() == 1
    finally:
        led.close()


def test_concurrent_records_from_threads(any_ledger: OrderLedger) -> None:
    """8 workers record 50 orders each, and all race for one shared order: every step lands, one name wins."""
    ledger = any_ledger
    shared = "f" * 32
    workers, per_worker = 8, 50
    barrier = threading.Barrier(workers)
    shared_names: list[str] = []
    errors: list[BaseException] = []

    def work(w: int) -> None:
        try:
            barrier.wait()
            shared_names.append(intent(ledger, order=shared, name=f"name-from-worker-{w}.json"))
            for i in range(per_worker):
                order = f"{w:08x}{i:024x}"
                assert intent(ledger, order=order, name=f"{order}.json") == f"{order}.json"
                ledger.record_written(order, at=f"w{w}")
                ledger.record_completed(order, order_type="create", offering="capstor", outcome="done", at=f"c{i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert ledger.count() == workers * per_worker + 1
    assert len(shared_names) == workers and len(set(shared_names)) == 1  # the first reservation is everyone's
    for w in range(workers):
        for i in range(per_worker):
            record = ledger.get(f"{w:08x}{i:024x}")
            assert record is not None
            assert record.written_at == f"w{w}" and record.completed_at == f"c{i}" and record.outcome == "done"


def _queued_while_the_connection_is_busy(ledger: Ledger, calls: list[Callable[[], object]]) -> list[object]:
    """Run `calls` on threads while the test holds the connection (as a commit being fsynced would), so that they
    queue up and are committed together once it is released; their results (or exceptions) in order."""
    results: list[object] = [None] * len(calls)

    def call(index: int) -> None:
        try:
            results[index] = calls[index]()
        except Exception as exc:
            results[index] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(calls))]
    with ledger._lock:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while len(ledger._queued) < len(calls) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(ledger._queued) == len(calls)
    for thread in threads:
        thread.join(10)
    return results


def test_writes_queued_during_a_commit_are_committed_together(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    led = Ledger(path)
    orders = [f"{i:032x}" for i in range(6)]
    results = _queued_while_the_connection_is_busy(
        led, [partial(intent, led, order=o, name=f"{o}.json") for o in orders]
    )
    assert results == [f"{o}.json" for o in orders]
    led.close()
    reopened = Ledger(path)
    try:
        assert [r.file_name if (r := reopened.get(o)) else None for o in orders] == [f"{o}.json" for o in orders]
    finally:
        reopened.close()


def test_a_failing_write_in_a_batch_fails_alone(ledger: Ledger) -> None:
    """The batch is rolled back and its writes run one by one: only the failing caller sees the error."""
    others = [f"{i:032x}" for i in range(3)]
    results = _queued_while_the_connection_is_busy(
        ledger,
        [partial(intent, ledger, order=o, name=f"{o}.json") for o in others]
        + [lambda: ledger._write(lambda db: db.execute("INSERT INTO no_such_table VALUES (1)"))],
    )
    assert results[:3] == [f"{o}.json" for o in others]
    assert isinstance(results[3], sqlite3.OperationalError)
    assert ledger.count() == 3
