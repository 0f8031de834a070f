"""The mirror: the in-memory set of one offering's resources (events spec §4).

uuid → the last Waldur JSON (the fields of it that matter, `KEPT_FIELDS`) and the last *valid* storage object. A
resource that turns invalid keeps its last valid object (it must not vanish from the feed: consumers would read that
as a deletion); one never seen valid is left out. Mapping is pure, so the mirror maps on every change and keeps the
result.

What a resource costs. A Waldur resource has ~75 fields, ~7 KB as parsed Python objects. The mirror keeps the 16
that the mapping, the feed order and the HTTP API's debug view read, as compact JSON (`kept_json`, ~390 bytes; the
debug view parses it back), next to the storage object (~1.1 KB): ~2.5 KB a resource in all. The same bytes tell
whether a resource changed: one whose kept JSON is unchanged is not mapped again, and its entry stays the same
object. A full listing is taken page by page (`MirrorListing`, fed by the gateway as each page arrives), so the
listing's raw JSON is never all held, and the mirror changes in one step once the listing is complete: a listing
that fails half-way changes nothing.
"""

from __future__ import annotations

import contextlib
import json
import math
import operator
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import orjson

from cscs_storage_daemon.mapping import (
    MAPPED_FIELDS,
    InvalidResource,
    MappingSettings,
    gc_paused,
    map_resource,
    uuid_hex,
)

Warn = Callable[[str, dict[str, Any]], None]

#: The fields of a Waldur resource the mirror keeps: what the mapping reads, the feed order's ``created`` and what
#: the HTTP API's debug view shows (`api.query.RAW_FIELDS`, a subset: a test holds it to that).
KEPT_FIELDS: Final = (
    *MAPPED_FIELDS,
    "name",
    "customer_name",
    "project_name",
    "offering_type",
    "created",
    "modified",
)
_GET_KEPT: Final = operator.itemgetter(*KEPT_FIELDS)
_STATE_AT: Final = KEPT_FIELDS.index("state")
_CREATED_AT: Final = KEPT_FIELDS.index("created")
_LOWER_HEX: Final = "0123456789abcdef"


def kept_fields(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The resource cut down to `KEPT_FIELDS` (absent fields stay absent; values are shared, not copied)."""
    try:
        return dict(zip(KEPT_FIELDS, _GET_KEPT(raw), strict=True))  # every field there: the common case
    except KeyError:
        return {name: raw[name] for name in KEPT_FIELDS if name in raw}


def kept_json(kept: Mapping[str, Any]) -> bytes:
    """The kept fields as compact JSON: what the mirror holds of the Waldur JSON, and what tells a change.

    Every field present (the rule for Waldur's resources): the values as a JSON array in `KEPT_FIELDS` order, the
    names left out (~390 bytes a resource instead of ~580); otherwise a JSON object. Exact: two inputs give the same
    bytes only when they are the same JSON. orjson writes a non-finite float as ``null`` and refuses integers past
    64 bits and lone surrogates; such inputs (never from Waldur, whose encoder refuses NaN) are written by the
    standard library instead (``NaN``, the integer's digits, ``\\ud800``), after a space that tells
    `parse_kept_json` to read them back the same way (orjson would read a big integer as a float).
    """
    if len(kept) == len(KEPT_FIELDS):
        return _kept_json(tuple(kept[name] for name in KEPT_FIELDS))
    return _kept_json(kept)


def _kept_json(value: tuple[Any, ...] | Mapping[str, Any]) -> bytes:
    try:
        data = orjson.dumps(value)
    except TypeError:
        return _standard_json(value)
    if b"null" in data and _has_non_finite(value):
        return _standard_json(value)
    return data


def parse_kept_json(data: bytes) -> dict[str, Any]:
    """The kept fields back from `kept_json`."""
    value = json.loads(data) if data[:1] == b" " else orjson.loads(data)
    if isinstance(value, list) and len(value) == len(KEPT_FIELDS):
        return dict(zip(KEPT_FIELDS, value, strict=True))
    return value if isinstance(value, dict) else {}


def _standard_json(value: Any) -> bytes:
    text = json.dumps(value, ensure_ascii=True, allow_nan=True, separators=(",", ":"), default=repr)
    return b" " + text.encode("ascii")


#: Longest piece of kept JSON held in one bytes object: with its header, within the 512 bytes that Python's
#: small-object allocator serves.
PIECE_BYTES: Final = 448

Packed = bytes | tuple[bytes, ...]


def pack(data: bytes) -> Packed:
    """`data` copied into pieces the small-object allocator holds (one bytes object when it fits).

    Why: orjson's output is a block of the C allocator, and a hundred thousand of them kept while a listing's
    pages come and go fragment its heap (a listing of 100 000 resources left ~800 MB of free but unusable memory
    behind). The small-object allocator keeps blocks of one size together, so freed space is used again.
    """
    view = memoryview(data)
    if len(data) <= PIECE_BYTES:
        return view.tobytes()
    return tuple(bytes(view[start : start + PIECE_BYTES]) for start in range(0, len(data), PIECE_BYTES))


def unpack(packed: Packed) -> bytes:
    return packed if isinstance(packed, bytes) else b"".join(packed)


def _has_non_finite(value: Any) -> bool:
    """Whether a NaN or an infinity is anywhere in a JSON-like value."""
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is float:
            if item != item or item in (math.inf, -math.inf):
                return True
        elif kind is dict or isinstance(item, Mapping):
            stack.extend(item.values())
        elif kind is list or kind is tuple:
            stack.extend(item)
    return False


@dataclass(slots=True)
class MirrorEntry:
    uuid: str
    kept: Packed  # the Waldur JSON's `KEPT_FIELDS`, compact (`kept_json`, `pack`)
    state: str | None  # Waldur's ``state``, when a string
    storage: dict[str, Any] | None
    error: InvalidResource | None
    terminated_since: float | None = None
    sort_key: str = ""  # feed order: Waldur ``created``, then uuid (`_sort_key`)

    @property
    def raw(self) -> dict[str, Any]:
        """The Waldur JSON the entry holds (`KEPT_FIELDS` of it), parsed again on each call."""
        return parse_kept_json(unpack(self.kept))

    @property
    def visible(self) -> bool:
        return self.storage is not None


_SORT_KEY: Final = operator.attrgetter("sort_key")


def _sort_key(created: Any, key: str | None) -> str:
    """``created`` and the uuid in one string that sorts as the pair would: NUL, below every other character, ends
    ``created`` (one string, not a tuple: a hundred thousand fewer objects for the collector to walk)."""
    return f"{created if type(created) is str else ''}\0{key or ''}"


class Change(NamedTuple):
    """What one `apply` did: `changed` when the visible storage object changed; `error` when the resource is
    invalid now, with `new_error` true the first time this exact input is seen invalid (log it then, once).
    (A named tuple: one per resource of a listing, built three times faster than a frozen dataclass.)"""

    uuid: str
    changed: bool
    error: InvalidResource | None = None
    new_error: bool = False
    stale: bool = False  # invalid but an older valid object is still served


@dataclass(slots=True)
class _Mapped:
    """One resource made ready for the mirror, outside its lock: the uuid as key (``None`` when unusable), what the
    entry keeps of it and the mapping's outcome."""

    key: str | None
    uuid_text: str
    kept: Packed
    state: str | None
    sort_key: str
    storage: dict[str, Any] | None
    error: InvalidResource | None


class MirrorListing:
    """A full listing on its way into a mirror, page by page (the gateway's `ListingSink`).

    Each page's resources are cut down and mapped as it arrives; one unchanged since the mirror took it (the same
    kept JSON) is not mapped again: the entry's objects are reused. `OfferingMirror.replace_all` takes the finished
    listing in one step. `restart` drops what was taken (the gateway starts a listing over when Waldur's
    collection changed under it).

    Used as a context manager (``with mirror.listing() as listing:``), it pauses the cyclic collector until the
    listing is in: the hundreds of thousands of objects a large listing leaves in the mirror hold no reference cycle,
    and the full collections that ran between pages while they piled up walked them again and again. Whatever the
    process allocated meanwhile is collected when the block ends.
    """

    def __init__(self, mirror: OfferingMirror) -> None:
        self._mirror = mirror
        self.resources: list[_Mapped] = []
        self._paused: contextlib.ExitStack | None = None

    def __enter__(self) -> MirrorListing:
        self._paused = contextlib.ExitStack()
        self._paused.enter_context(gc_paused())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._paused is not None:
            self._paused.close()
            self._paused = None

    def restart(self) -> None:
        self.resources = []

    def take(self, raws: Iterable[Mapping[str, Any]]) -> None:
        prepare, append = self._mirror._prepare, self.resources.append
        with gc_paused():  # storage objects that all survive, without a reference cycle
            for raw in raws:
                append(prepare(raw))


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

    def _prepare(self, raw: Mapping[str, Any]) -> _Mapped:
        """Key, cut down and map one resource (no lock: mapping is pure). A resource whose kept JSON is its entry's
        is not mapped again: the entry's objects serve (the same input maps the same)."""
        raw_uuid = raw.get("uuid")
        if type(raw_uuid) is str and len(raw_uuid) == 32 and not raw_uuid.strip(_LOWER_HEX):
            key: str | None = raw_uuid  # already the key (Waldur's form): no copy
        else:
            key = uuid_hex(raw_uuid) if isinstance(raw_uuid, str) else None
        try:
            values = _GET_KEPT(raw)  # every kept field there: the common case, no dict built
        except KeyError:
            fields = kept_fields(raw)
            kept = pack(kept_json(fields))
            state, created = fields.get("state"), fields.get("created")
        else:
            kept = pack(_kept_json(values))
            state, created = values[_STATE_AT], values[_CREATED_AT]
        if key is not None:
            old = self._entries.get(key)
            if old is not None and old.kept == kept:
                stored = old.storage if old.error is None else None
                return _Mapped(key, key, old.kept, old.state, old.sort_key, stored, old.error)
        try:
            # The whole resource maps as its kept fields do (`MAPPED_FIELDS` are kept; a property test holds it).
            storage = map_resource(raw, self.settings, warn=self._warn)
            error: InvalidResource | None = None
        except InvalidResource as exc:
            storage, error = None, exc
        return _Mapped(
            key,
            key if key is not None else str(raw_uuid),
            kept,
            state if type(state) is str else None,
            _sort_key(created, key),
            storage,
            error,
        )

    def apply(self, raw: Mapping[str, Any]) -> Change:
        """Take the current Waldur JSON of one resource."""
        mapped = self._prepare(raw)
        with self._lock:
            return self._merge(mapped)

    def _merge(self, mapped: _Mapped) -> Change:
        """Put one mapped resource in (the lock held)."""
        key, storage, error, state = mapped.key, mapped.storage, mapped.error, mapped.state
        if key is None:
            # Unusable uuid: nothing to key it by; report it, serve nothing for it.
            return Change(uuid=mapped.uuid_text, changed=False, error=error, new_error=True)
        old = self._entries.get(key)
        if state == "Terminated" and key in self._expired:
            return Change(uuid=key, changed=False)
        self._expired.discard(key)  # restored: a later termination counts from scratch
        terminated_since = old.terminated_since if old else None
        if state == "Terminated":
            terminated_since = terminated_since if terminated_since is not None else self._clock()
        else:
            terminated_since = None
        same_input = old is not None and old.kept == mapped.kept
        if (
            same_input
            and old is not None
            and old.storage is storage
            and old.error is error
            and old.terminated_since == terminated_since
        ):
            # Nothing at all changed (a listing's common case): the entry stays the very same object, so what
            # readers cached for it (the API's rendered JSON) still serves.
            if error is None:
                return Change(uuid=key, changed=False)
            return Change(uuid=key, changed=False, error=error, new_error=False, stale=storage is not None)
        if error is None:
            changed = old is None or (old.storage is not storage and old.storage != storage)
            self._entries[key] = MirrorEntry(key, mapped.kept, state, storage, None, terminated_since, mapped.sort_key)
            self._invalid.discard(key)
            if changed or not same_input:
                self._touch()
            return Change(uuid=key, changed=changed)
        new_error = old is None or old.error is None or not same_input
        kept = old.storage if old else None
        self._entries[key] = MirrorEntry(key, mapped.kept, state, kept, error, terminated_since, mapped.sort_key)
        self._invalid.add(key)
        if not same_input:
            self._touch()
        return Change(uuid=key, changed=False, error=error, new_error=new_error, stale=kept is not None)

    def listing(self) -> MirrorListing:
        """An empty full listing for this mirror, to fill page by page and hand to `replace_all`."""
        return MirrorListing(self)

    def replace_all(self, raws: Iterable[Mapping[str, Any]] | MirrorListing) -> list[Change]:
        """A full listing from Waldur (a finished `MirrorListing`, or the resources themselves): take each, drop
        what Waldur no longer lists. One step under the lock: a reader sees the mirror before or after it.
        Returns a change per resource listed, in order, then one per resource dropped."""
        if isinstance(raws, MirrorListing):
            taken, raws.resources = raws.resources, []  # consumed: nothing of it outlives this step
        else:
            listing = self.listing()
            listing.take(raws)
            taken = listing.resources
        with self._lock, gc_paused():  # a whole listing: entries that all survive
            changes = [self._merge(mapped) for mapped in taken]
            del taken
            seen = {change.uuid for change in changes}
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
                self._sorted = tuple(sorted(self._entries.values(), key=_SORT_KEY))
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
