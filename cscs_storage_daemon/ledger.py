"""The order ledger (events spec §2): SQLite in the state directory.

Per order uuid: type, file name, written-at, completed-at. It is what makes a redelivered or reconciled order
produce no second file: the file step and the Waldur step are recorded separately, so only the missing one is
repeated.

Every write is durable when its call returns (WAL, ``synchronous=FULL``: the commit is fsynced). Writes that arrive
while another commit is being fsynced are committed together by the next one (group commit): a worker waiting for
the connection finds its write already done, or commits every write queued meanwhile in one transaction. Under load
that is one fsync for several orders' steps instead of one each; alone, a write is a single autocommit statement
as before. A batch that fails is rolled back and its writes are run again one by one, so a failure is only ever the
failing caller's.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    order_uuid   TEXT PRIMARY KEY,
    order_type   TEXT NOT NULL,
    offering     TEXT NOT NULL,
    resource_uuid TEXT,
    file_name    TEXT,
    written_at   TEXT,
    completed_at TEXT,
    outcome      TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class OrderRecord:
    order_uuid: str
    order_type: str
    offering: str
    resource_uuid: str | None
    file_name: str | None
    written_at: str | None
    completed_at: str | None
    outcome: str | None

    @property
    def written(self) -> bool:
        return self.written_at is not None

    @property
    def completed(self) -> bool:
        return self.completed_at is not None


class _Write:
    """One caller's statements, waiting to be committed (alone or with others)."""

    __slots__ = ("done", "error", "result", "steps")

    def __init__(self, steps: Callable[[sqlite3.Cursor], Any]) -> None:
        self.steps = steps
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = sqlite3.OperationalError("ledger write not committed")  # until it is

    def run(self, db: sqlite3.Cursor) -> None:
        """In autocommit mode: each statement is its own durable transaction."""
        try:
            self.result = self.steps(db)
        except Exception as exc:
            self.error = exc
        else:
            self.error = None


class Ledger:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # the connection
        self._queue_lock = threading.Lock()
        self._queued: list[_Write] = []  # mutated in place only: a RecordingLedger shares it
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        # Reads on a connection of their own: in WAL mode they do not wait for a commit's fsync (a read sees every
        # commit that returned before it began). An in-memory database exists once per connection: one for both.
        # One cursor for the writes and one for the reads, every SELECT stepped to its end (`fetchall`): no read
        # transaction stays open between calls, and no cursor per statement for the connection to keep track of.
        self._reader, self._read_lock = self._db, self._lock
        if str(path) != ":memory:":
            self._reader = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._reader.execute("PRAGMA query_only=1")
            self._read_lock = threading.Lock()
        self._read = self._reader.cursor()
        self._cursor = self._db.cursor()

    def _write(self, steps: Callable[[sqlite3.Cursor], Any]) -> Any:
        """Run `steps` on the connection and return once they are committed (durable), with their result."""
        write = _Write(steps)
        with self._queue_lock:
            self._queued.append(write)
        with self._lock:
            if not write.done:  # else a commit that took it finished while this thread waited for the connection
                self._commit_queued()
        if write.error is not None:
            raise write.error
        return write.result

    def _commit_queued(self) -> None:
        with self._queue_lock:
            batch = self._queued[:]
            self._queued.clear()
        try:
            if len(batch) == 1:
                batch[0].run(self._cursor)
            else:
                self._commit_together(batch)
        finally:
            for write in batch:
                write.done = True

    def _commit_together(self, batch: list[_Write]) -> None:
        db = self._cursor
        try:
            db.execute("BEGIN IMMEDIATE")
            results = [write.steps(db) for write in batch]
            db.execute("COMMIT")
        except Exception:
            try:
                if self._db.in_transaction:
                    db.execute("ROLLBACK")
            except Exception as exc:  # the connection is in an unknown state: nothing is claimed durable
                for write in batch:
                    write.error = exc
                return
            for write in batch:  # one by one: a failure is only the failing caller's
                write.run(db)
            return
        for write, result in zip(batch, results, strict=True):
            write.result, write.error = result, None

    def close(self) -> None:
        with self._read_lock:
            self._reader.close()
        with self._lock:
            self._db.close()

    def get(self, order_uuid: str) -> OrderRecord | None:
        with self._read_lock:
            rows = self._read.execute(
                "SELECT order_uuid, order_type, offering, resource_uuid, file_name, written_at, completed_at, outcome"
                " FROM orders WHERE order_uuid = ?",
                (order_uuid,),
            ).fetchall()
        return OrderRecord(*rows[0]) if rows else None

    def record_intent(
        self, order_uuid: str, *, order_type: str, offering: str, resource_uuid: str, file_name: str
    ) -> str:
        """Reserve the order file's name before writing it; an existing reservation is kept and returned."""

        def steps(db: sqlite3.Cursor) -> str:
            db.execute(
                "INSERT INTO orders (order_uuid, order_type, offering, resource_uuid, file_name)"
                " VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT(order_uuid) DO UPDATE SET file_name = COALESCE(orders.file_name, excluded.file_name),"
                " resource_uuid = excluded.resource_uuid",
                (order_uuid, order_type, offering, resource_uuid, file_name),
            )
            ((name,),) = db.execute("SELECT file_name FROM orders WHERE order_uuid = ?", (order_uuid,)).fetchall()
            return str(name)

        name: str = self._write(steps)
        return name

    def record_written(self, order_uuid: str, *, at: str) -> None:
        """The order file is durable."""
        self._write(lambda db: db.execute("UPDATE orders SET written_at = ? WHERE order_uuid = ?", (at, order_uuid)))

    def record_completed(self, order_uuid: str, *, order_type: str, offering: str, outcome: str, at: str) -> None:
        self._write(
            lambda db: db.execute(
                "INSERT INTO orders (order_uuid, order_type, offering, completed_at, outcome)"
                " VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT(order_uuid) DO UPDATE SET completed_at = excluded.completed_at,"
                " outcome = excluded.outcome",
                (order_uuid, order_type, offering, at, outcome),
            )
        )

    def count(self) -> int:
        with self._read_lock:
            ((n,),) = self._read.execute("SELECT COUNT(*) FROM orders").fetchall()
        return int(n)


class MemoryLedger:
    """`Ledger`'s rules without SQLite and without durability: a row per order in a dict.

    For the replay, which starts from an empty ledger (plus the rows the capture recorded) and keeps nothing past
    its run: there, SQLite's statements, the commit queue and their locks were a sixth of the time. Same answers as
    `Ledger` for the same calls (tests/test_ledger.py runs its rules against both).
    """

    def __init__(self) -> None:
        self._rows: dict[str, OrderRecord] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        pass

    def get(self, order_uuid: str) -> OrderRecord | None:
        return self._rows.get(order_uuid)

    def record_intent(
        self, order_uuid: str, *, order_type: str, offering: str, resource_uuid: str, file_name: str
    ) -> str:
        """Reserve the order file's name before writing it; an existing reservation is kept and returned."""
        with self._lock:
            row = self._rows.get(order_uuid)
            if row is None:
                row = OrderRecord(order_uuid, order_type, offering, resource_uuid, file_name, None, None, None)
            else:
                kept = row.file_name if row.file_name is not None else file_name
                row = replace(row, file_name=kept, resource_uuid=resource_uuid)
            self._rows[order_uuid] = row
            return str(row.file_name)

    def record_written(self, order_uuid: str, *, at: str) -> None:
        with self._lock:
            row = self._rows.get(order_uuid)
            if row is not None:
                self._rows[order_uuid] = replace(row, written_at=at)

    def record_completed(self, order_uuid: str, *, order_type: str, offering: str, outcome: str, at: str) -> None:
        with self._lock:
            row = self._rows.get(order_uuid)
            if row is None:
                row = OrderRecord(order_uuid, order_type, offering, None, None, None, at, outcome)
            else:
                row = replace(row, completed_at=at, outcome=outcome)
            self._rows[order_uuid] = row

    def count(self) -> int:
        return len(self._rows)


#: What the processor, the capture and the replay need of a ledger.
OrderLedger = Ledger | MemoryLedger
