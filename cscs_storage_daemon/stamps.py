"""The clock readings that end up in files (order files and all.json: names and `meta.date`).

Live, each reading is taken from the clock and handed to an optional recorder (the capture); a replay answers the
same questions from the recorded readings (`source`), so it writes byte-identical files.

`section()` brackets a reading together with what it is read with (the all.json stamp and the mirror read): the
capture makes that pair atomic with respect to recorded mirror changes, so a replay sees the mirror the live run saw.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime

from cscs_storage_daemon.clock import Clock

StampRecorder = Callable[[str, str, datetime], None]  # kind ("order" | "snapshot"), key, reading
StampSource = Callable[[str, str], datetime]  # kind, key → the reading to use (replay)
Section = Callable[[], AbstractContextManager[object]]


class Stamps:
    def __init__(
        self,
        clock: Clock,
        recorder: StampRecorder | None = None,
        *,
        source: StampSource | None = None,
        section: Section | None = None,
    ) -> None:
        self.clock = clock
        self.recorder = recorder
        self.source = source
        self._section = section

    def _take(self, kind: str, key: str) -> datetime:
        reading = self.source(kind, key) if self.source is not None else self.clock.now()
        if self.recorder is not None:
            self.recorder(kind, key, reading)
        return reading

    def for_order(self, order_uuid: str) -> datetime:
        return self._take("order", order_uuid)

    def for_snapshot(self, offering_slug: str) -> datetime:
        return self._take("snapshot", offering_slug)

    def section(self) -> AbstractContextManager[object]:
        """A reading and the state read with it, as one step (a no-op unless a capture or replay set one)."""
        return self._section() if self._section is not None else nullcontext()
