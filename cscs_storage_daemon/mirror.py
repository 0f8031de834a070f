"""The mirror: the in-memory set of one offering's resources (events spec §4).

uuid → the last Waldur JSON and the last *valid* storage object. A resource that turns invalid keeps its last
valid object (it must not vanish from the feed: consumers would read that as a deletion); one never seen valid is
left out. Mapping is pure, so the mirror maps on every change and keeps the result.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cscs_storage_daemon.mapping import InvalidResource, MappingSettings, gc_paused, map_resource, uuid_hex

Warn = Callable[[str, dict[str, Any]], None]


@dataclass(slots=True)
class MirrorEntry:
    uuid: str
    raw: dict[str, Any]
    storage: dict[str, Any] | None
    error: InvalidResource | None
    terminated_since: float | None = None

    @property
    def sort_key(self) -> tuple[str, str]:
        created = self.raw.get("created")
        return (created if isinstance(created, str) else "", self.uuid)

    @property
    def visible(self) -> bool:
        return self.storage is not None


@dataclass(frozen=True, slots=True)
class Change:
    """What one `apply` did: `changed` when the visible storage object changed; `error` when the resource is
    invalid now, with `new_error` true the first time this exact input is seen invalid (log it then, once)."""

    uuid: str
    changed: bool
    error: InvalidResource | None = None
    new_error: bool = False
    stale: bool = False  # invalid but an older valid object is still served


class OfferingMirror:
    def __init__(
        self,
        slug: str,
        settings: MappingSettings,
        *,
        removed_retention: float = 7 * 86400,
        clock: Callable[[], float] = time.time,
        warn: Warn | None = None,
    ) -> None:
        self.slug = slug
        self.settings = settings
        self.removed_retention = removed_retention
        self._clock = clock
        self._warn = warn
        self._lock = threading.RLock()
        self._entries: dict[str, MirrorEntry] = {}
        self._invalid: set[str] = set()  # uuids whose current Waldur JSON is invalid
        # Terminated resources already expired: Waldur keeps listing them, and they must not come back.
        self._expired: set[str] = set()
        self._version = 0
        self._sorted: tuple[MirrorEntry, ...] | None = None

    @property
    def version(self) -> int:
        """Increases on every change of what the mirror serves."""
        return self._version

    def __len__(self) -> int:
        return len(self._entries)

    def _touch(self) -> None:
        self._version += 1
        self._sorted = None

    def apply(self, raw: Mapping[str, Any]) -> Change:
        """Take the current Waldur JSON of one resource."""
        raw = dict(raw)
        key = uuid_hex(raw.get("uuid")) if isinstance(raw.get("uuid"), str) else None
        try:
            storage = map_resource(raw, self.settings, warn=self._warn)
            error: InvalidResource | None = None
        except InvalidResource as exc:
            storage, error = None, exc
        if key is None:
            # Unusable uuid: nothing to key it by; report it, serve nothing for it.
            return Change(uuid=str(raw.get("uuid")), changed=False, error=error, new_error=True)
        with self._lock:
            old = self._entries.get(key)
            state = raw.get("state")
            if state == "Terminated" and key in self._expired:
                return Change(uuid=key, changed=False)
            self._expired.discard(key)  # restored: a later termination counts from scratch
            terminated_since = old.terminated_since if old else None
            if state == "Terminated":
                terminated_since = terminated_since if terminated_since is not None else self._clock()
            else:
                terminated_since = None
            if error is None:
                changed = old is None or old.storage != storage
                self._entries[key] = MirrorEntry(key, raw, storage, None, terminated_since)
                self._invalid.discard(key)
                if changed or old is None or old.raw != raw:
                    self._touch()
                return Change(uuid=key, changed=changed)
            new_error = old is None or old.error is None or old.raw != raw
            kept = old.storage if old else None
            self._entries[key] = MirrorEntry(key, raw, kept, error, terminated_since)
            self._invalid.add(key)
            if old is None or old.raw != raw:
                self._touch()
            return Change(uuid=key, changed=False, error=error, new_error=new_error, stale=kept is not None)

    def replace_all(self, raws: Iterable[Mapping[str, Any]]) -> list[Change]:
        """A full listing from Waldur: apply each, drop what Waldur no longer lists."""
        with gc_paused():  # a whole listing: 100 000 storage objects and entries that all survive
            changes = [self.apply(raw) for raw in raws]
        seen = {change.uuid for change in changes}
        with self._lock:
            self._expired &= seen  # tombstones only for what Waldur still lists
            gone = [key for key in self._entries if key not in seen]
            for key in gone:
                del self._entries[key]
                self._invalid.discard(key)
                changes.append(Change(uuid=key, changed=True))
            if gone:
                self._touch()
        return changes

    def remove(self, uuid: str) -> bool:
        key = uuid_hex(uuid)
        with self._lock:
            if key is None or key not in self._entries:
                return False
            del self._entries[key]
            self._invalid.discard(key)
            self._touch()
            return True

    def expire_removed(self) -> list[str]:
        """Forget Terminated resources seen so for longer than `removed_retention`."""
        now = self._clock()
        with self._lock:
            expired = [
                key
                for key, entry in self._entries.items()
                if entry.terminated_since is not None and now - entry.terminated_since >= self.removed_retention
            ]
            for key in expired:
                del self._entries[key]
                self._invalid.discard(key)
                self._expired.add(key)
            if expired:
                self._touch()
        return expired

    def get(self, uuid: str) -> MirrorEntry | None:
        key = uuid_hex(uuid)
        return self._entries.get(key) if key else None

    def entries(self) -> tuple[MirrorEntry, ...]:
        """Every entry, in the stable feed order (Waldur `created`, then uuid). Cached until the next change."""
        with self._lock:
            if self._sorted is None:
                self._sorted = tuple(sorted(self._entries.values(), key=lambda e: e.sort_key))
            return self._sorted

    def storage_objects(self) -> list[dict[str, Any]]:
        """Every valid (or last valid) storage object, in feed order: the content of all.json."""
        return [entry.storage for entry in self.entries() if entry.storage is not None]

    @property
    def invalid_count(self) -> int:
        """How many resources are invalid now (skipped or served stale), without sorting anything."""
        return len(self._invalid)

    def invalid(self) -> list[MirrorEntry]:
        return [entry for entry in self.entries() if entry.error is not None]
