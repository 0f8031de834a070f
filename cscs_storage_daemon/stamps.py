"""The clock readings that end up in files (order files and all.json: names and `meta.date`).

Live, each reading is taken from the clock and handed to an optional recorder (the capture); a replay answers the
same questions from the recorded readings, so it writes byte-identical files.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from cscs_storage_daemon.clock import Clock

StampRecorder = Callable[[str, str, datetime], None]  # kind ("order" | "snapshot"), key, reading


class Stamps:
    def __init__(self, clock: Clock, recorder: StampRecorder | None = None) -> None:
        self.clock = clock
        self.recorder = recorder

    def _take(self, kind: str, key: str) -> datetime:
        reading = self.clock.now()
        if self.recorder is not None:
            self.recorder(kind, key, reading)
        return reading

    def for_order(self, order_uuid: str) -> datetime:
        return self._take("order", order_uuid)

    def for_snapshot(self, offering_slug: str) -> datetime:
        return self._take("snapshot", offering_slug)
