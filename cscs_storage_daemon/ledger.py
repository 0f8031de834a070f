"""The order ledger (events spec §2): SQLite in the state directory.

Per order uuid: type, file name, written-at, completed-at. It is what makes a redelivered or reconciled order
produce no second file: the file step and the Waldur step are recorded separately, so only the missing one is
repeated.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

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


class Ledger:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def get(self, order_uuid: str) -> OrderRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT order_uuid, order_type, offering, resource_uuid, file_name, written_at, completed_at, outcome"
                " FROM orders WHERE order_uuid = ?",
                (order_uuid,),
            ).fetchone()
        return OrderRecord(*row) if row else None

    def record_intent(
        self, order_uuid: str, *, order_type: str, offering: str, resource_uuid: str, file_name: str
    ) -> str:
        """Reserve the order file's name before writing it; an existing reservation is kept and returned."""
        with self._lock:
            self._db.execute(
                "INSERT INTO orders (order_uuid, order_type, offering, resource_uuid, file_name)"
                " VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT(order_uuid) DO UPDATE SET file_name = COALESCE(orders.file_name, excluded.file_name),"
                " resource_uuid = excluded.resource_uuid",
                (order_uuid, order_type, offering, resource_uuid, file_name),
            )
            row = self._db.execute("SELECT file_name FROM orders WHERE order_uuid = ?", (order_uuid,)).fetchone()
        return str(row[0])

    def record_written(self, order_uuid: str, *, at: str) -> None:
        """The order file is durable."""
        with self._lock:
            self._db.execute("UPDATE orders SET written_at = ? WHERE order_uuid = ?", (at, order_uuid))

    def record_completed(self, order_uuid: str, *, order_type: str, offering: str, outcome: str, at: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO orders (order_uuid, order_type, offering, completed_at, outcome)"
                " VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT(order_uuid) DO UPDATE SET completed_at = excluded.completed_at,"
                " outcome = excluded.outcome",
                (order_uuid, order_type, offering, at, outcome),
            )

    def count(self) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM orders").fetchone()
        return int(n)
