"""Debounce rules for all.json (events spec §4). Pure: times go in, decisions come out."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DebounceRules:
    quiet: float = 2.0
    max_wait: float = 30.0
    heartbeat: float = 3600.0


@dataclass(slots=True)
class Debouncer:
    """Tracks the unsaved changes of one offering.

    `due_at()` is when the next regeneration should run: `quiet` seconds after the last change, but no later than
    `max_wait` after the first unsaved change; with no unsaved change, the heartbeat after the last write.
    """

    rules: DebounceRules
    first_change: float | None = None
    last_change: float | None = None
    last_write: float | None = None

    def changed(self, now: float) -> None:
        if self.first_change is None:
            self.first_change = now
        self.last_change = now

    @property
    def pending(self) -> bool:
        return self.first_change is not None

    def due_at(self) -> float | None:
        if self.first_change is not None and self.last_change is not None:
            return min(self.last_change + self.rules.quiet, self.first_change + self.rules.max_wait)
        if self.last_write is not None:
            return self.last_write + self.rules.heartbeat
        return None

    def is_due(self, now: float) -> bool:
        due = self.due_at()
        return due is not None and now >= due

    def heartbeat_due(self, now: float) -> bool:
        """True when even unchanged content must be rewritten so consumers see the feed is alive."""
        return self.last_write is None or now >= self.last_write + self.rules.heartbeat

    def started(self) -> tuple[float | None, float | None]:
        """Take the unsaved changes into a regeneration; returns them so a failed write can give them back."""
        taken = (self.first_change, self.last_change)
        self.first_change = None
        self.last_change = None
        return taken

    def finished(self, now: float, *, wrote: bool) -> None:
        if wrote or self.last_write is None:
            self.last_write = now

    def failed(self, taken: tuple[float | None, float | None], now: float) -> None:
        """A regeneration failed: the changes are unsaved again and retried after `quiet`.

        Also when nothing had changed (a heartbeat or a forced first write): the file on disk is still not what it
        should be, and leaving the heartbeat overdue would retry at once, in a tight loop against a failing disk.
        """
        del taken  # whatever was taken, the retry is one `quiet` from now
        self.first_change = now
        self.last_change = now
