"""Filtering, pagination and indexes over a mirror snapshot (pure; no I/O, no web framework).

The API answers every request from memory. Filtering 100 000 entries per request would cost tens of milliseconds,
so each mirror version gets a `MirrorView`: the entries in feed order, and `FilterIndex`es that map the values of
the filters given in a request to the positions of the matching entries, in feed order. An index is built once per
mirror version and per *combination* of filters used (lazily: most versions only ever see a few combinations), so a
request costs a dict look-up plus a slice of `page_size` positions.

Two views of the same mirror are indexed:

* normal mode: the entries that have a storage object (valid now, or last valid), keyed by the data type and status
  of the object served (``storageDataType.key``, ``status``) and the resource's current Waldur ``state``;
* debug mode: every entry, keyed by `effective_data_type`, `status_of` and ``state`` of the raw Waldur JSON (so
  resources that were never valid show up there too: that is what one debugs).

Storage objects are rendered to compact JSON once and kept (per entry object, carried over to later views while
the entry is unchanged), so a page is a join of cached bytes.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Generic, TypeVar

import orjson

from cscs_storage_daemon.envelope import paginate
from cscs_storage_daemon.mapping import effective_data_type, status_of
from cscs_storage_daemon.mirror import MirrorEntry, OfferingMirror

__all__ = [
    "RAW_FIELDS",
    "FilterIndex",
    "Filters",
    "MirrorView",
    "MirrorViews",
    "Page",
    "compact_json",
    "page_bounds",
    "raw_resource",
]

FilterKey = tuple[str, str, str]  # (data_type, status, state)
T = TypeVar("T")

# The fields of a raw resource in debug mode (spec http-api.md "Debug mode"), in this order.
RAW_FIELDS = (
    "uuid",
    "name",
    "slug",
    "state",
    "customer_slug",
    "customer_name",
    "project_slug",
    "project_name",
    "offering_slug",
    "offering_type",
    "limits",
    "attributes",
    "backend_metadata",
    "created",
    "modified",
)
_OBJECT_FIELDS = frozenset({"limits", "attributes", "backend_metadata"})


def compact_json(value: Any) -> bytes:
    """Compact UTF-8 JSON, as Starlette's `JSONResponse` renders it: orjson (several times faster), or the
    standard library for what orjson refuses (integers past 64 bits, non-string keys). Both write the same bytes
    for the storage objects `map_resource` makes; the standard path refuses NaN, orjson writes ``null``."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


@dataclass(frozen=True, slots=True)
class Filters:
    """The optional exact-match filters of a request; None = not filtered on."""

    data_type: str | None = None
    status: str | None = None
    state: str | None = None

    def key(self) -> tuple[str | None, str | None, str | None]:
        return (self.data_type, self.status, self.state)


class FilterIndex(Generic[T]):
    """Positions (0..n-1, feed order) of the items matching any combination of exact filters.

    `key(item)` gives the ``(data_type, status, state)`` of an item. `select` returns a sequence of positions in
    ascending order. Keys are computed on the first filtered `select`, and the mapping for a combination of filters
    on its first use (thread-safe); an unfiltered `select` costs nothing.
    """

    __slots__ = ("_by_mask", "_items", "_key", "_keys", "_lock", "_positions", "_seed")

    def __init__(
        self,
        items: Sequence[T],
        key: Callable[[T], FilterKey],
        *,
        seed: tuple[Sequence[T], Sequence[FilterKey]] | None = None,
    ) -> None:
        self._items = items
        self._key = key
        self._keys: list[FilterKey] | None = None
        # (items, keys) of an earlier index: the key of an item found there (same object) is reused
        self._seed = seed
        self._positions: list[int] | None = None
        self._by_mask: dict[tuple[int, ...], dict[Any, list[int]]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def select(self, filters: Filters) -> Sequence[int]:
        wanted = filters.key()
        fields = tuple(i for i, value in enumerate(wanted) if value is not None)
        if not fields:
            return range(len(self._items))
        groups = self._by_mask.get(fields)
        if groups is None:
            groups = self._build(fields)
        lookup: Any = wanted[fields[0]] if len(fields) == 1 else tuple(wanted[i] for i in fields)
        return groups.get(lookup, ())

    @property
    def keys(self) -> Sequence[FilterKey] | None:
        """The keys, once computed (None before the first filtered `select`)."""
        return self._keys

    @property
    def seed(self) -> tuple[Sequence[T], Sequence[FilterKey]] | None:
        """What this index can lend a later one: its own (items, keys), else the seed it has not used yet."""
        if self._keys is not None:
            return (self._items, self._keys)
        return self._seed

    def _compute_keys(self) -> list[FilterKey]:
        key, seed, self._seed = self._key, self._seed, None
        if seed is None:
            return [key(item) for item in self._items]
        old_items, old_keys = seed
        where = {id(item): n for n, item in enumerate(old_items)}
        keys: list[FilterKey] = []
        append = keys.append
        for item in self._items:
            n = where.get(id(item))
            # `old_items` is alive here, so an id found there is that object's only if it is the same object
            append(old_keys[n] if n is not None and old_items[n] is item else key(item))
        return keys

    def _build(self, fields: tuple[int, ...]) -> dict[Any, list[int]]:
        with self._lock:
            groups = self._by_mask.get(fields)
            if groups is not None:
                return groups
            if self._keys is None or self._positions is None:
                self._keys = self._compute_keys()
                # One int object per position, shared by every mask's lists.
                self._positions = list(range(len(self._items)))
            getter = itemgetter(*fields)  # a scalar for one field, a tuple for several
            built: dict[Any, list[int]] = {}
            for position, key in zip(self._positions, self._keys, strict=True):
                group_key = getter(key)
                group = built.get(group_key)
                if group is None:
                    built[group_key] = [position]
                else:
                    group.append(position)
            self._by_mask[fields] = built
            return built


def page_bounds(total: int, page: int, page_size: int) -> tuple[int, int]:
    """``[start, stop)`` of a page over `total` items; empty (``start == stop``) past the end."""
    if page < 1 or page_size < 1:
        raise ValueError("page and page_size must be at least 1")
    start = (page - 1) * page_size
    if start >= total:
        return total, total
    return start, min(start + page_size, total)


@dataclass(frozen=True, slots=True)
class Page:
    """One page: the positions on it (into the view's sequence) and the `paginate` object over the filtered set."""

    positions: Sequence[int]
    pagination: dict[str, int]


def _select_page(index: FilterIndex[MirrorEntry], filters: Filters, page: int, page_size: int) -> Page:
    matches = index.select(filters)
    total = len(matches)
    start, stop = page_bounds(total, page, page_size)
    return Page(matches[start:stop], paginate(total=total, page=page, page_size=page_size))


def _served_key(entry: MirrorEntry) -> FilterKey:
    """Normal mode: what the served storage object says (data type, status) and the Waldur state."""
    storage = entry.storage or {}
    state = entry.state
    try:
        data_type = storage["storageDataType"]["key"]
        status = storage["status"]
        if type(data_type) is str and type(status) is str and type(state) is str:
            return (data_type, status, state)
    except (KeyError, TypeError):
        pass
    # Not the shape `map_resource` makes: fall back on the raw resource.
    item = storage.get("storageDataType")
    data_type = item.get("key") if isinstance(item, Mapping) else None
    if not isinstance(data_type, str):
        data_type = effective_data_type(entry.raw)
    status = storage.get("status")
    if not isinstance(status, str):
        status = status_of(entry.raw)
    return (data_type, status, state or "")


def _raw_key(entry: MirrorEntry) -> FilterKey:
    """Debug mode: the raw Waldur JSON's effective data type, mapped status and state."""
    raw = entry.raw  # parsed from the entry's kept JSON: debug mode only
    return (effective_data_type(raw), status_of(raw), entry.state or "")


def raw_resource(entry: MirrorEntry) -> dict[str, Any]:
    """One resource of debug mode's ``raw_resources``: `RAW_FIELDS` of the mirror's raw JSON, uuid as hex, the
    object fields ``{}`` when absent or null."""
    raw = entry.raw
    out: dict[str, Any] = {}
    for name in RAW_FIELDS:
        if name == "uuid":
            out[name] = entry.uuid
        elif name in _OBJECT_FIELDS:
            value = raw.get(name)
            out[name] = {} if value is None else value
        else:
            out[name] = raw.get(name)
    return out


class MirrorView:
    """One version of a mirror, indexed. Immutable apart from its caches; safe to share between threads.

    `previous` (the view of an earlier version) lends its rendered JSON: an entry object that is unchanged keeps
    its bytes. The look-up table is built on the first rendering miss, and the previous view is dropped then.
    """

    def __init__(
        self,
        entries: tuple[MirrorEntry, ...],
        *,
        version: int = 0,
        render: Callable[[dict[str, Any]], bytes] = compact_json,
        previous: MirrorView | None = None,
    ) -> None:
        self.version = version
        self.entries = entries
        self._previous: MirrorView | None = None
        self._carried: dict[int, tuple[MirrorEntry, bytes]] | None = None
        self.visible: tuple[MirrorEntry, ...] = tuple(e for e in entries if e.storage is not None)
        self.index: FilterIndex[MirrorEntry] = FilterIndex(
            self.visible, _served_key, seed=previous.index.seed if previous is not None else None
        )
        self.raw_index: FilterIndex[MirrorEntry] = FilterIndex(
            self.entries, _raw_key, seed=previous.raw_index.seed if previous is not None else None
        )
        self._render = render
        self._lock = threading.Lock()
        self._rendered: list[bytes | None] = [None] * len(self.visible)
        # A view that never rendered anything still points at its own previous one: skip it, so that views
        # created without being read (health checks while the mirror changes) never form a chain.
        if previous is not None and previous._carried is None and previous._previous is not None:
            previous = previous._previous
        self._previous = previous

    @property
    def total(self) -> int:
        """The number of storage objects served (the unfiltered total)."""
        return len(self.visible)

    def _carry(self) -> dict[int, tuple[MirrorEntry, bytes]]:
        with self._lock:
            if self._carried is None:
                previous, self._previous = self._previous, None
                self._carried = previous.renderings() if previous is not None else {}
            return self._carried

    def rendered(self, position: int) -> bytes:
        """The compact JSON of the storage object at `position` of `visible` (rendered once)."""
        cached = self._rendered[position]
        if cached is None:
            entry = self.visible[position]
            kept = self._carry().get(id(entry))
            if kept is not None and kept[0] is entry:
                cached = kept[1]
            else:
                assert entry.storage is not None
                cached = self._render(entry.storage)
            self._rendered[position] = cached  # a benign race: two threads may store the same bytes
        return cached

    def renderings(self) -> dict[int, tuple[MirrorEntry, bytes]]:
        """Rendered JSON by entry object id (the entry is kept to pin its id), this view's and what it carried."""
        carried = self._carry()
        out: dict[int, tuple[MirrorEntry, bytes]] = {}
        for entry, data in zip(self.visible, self._rendered, strict=True):
            if data is None:
                kept = carried.get(id(entry))
                if kept is None or kept[0] is not entry:
                    continue
                data = kept[1]
            out[id(entry)] = (entry, data)
        return out

    def page(self, filters: Filters, page: int, page_size: int) -> Page:
        """Normal mode: positions into `visible`."""
        return _select_page(self.index, filters, page, page_size)

    def raw_page(self, filters: Filters, page: int, page_size: int) -> Page:
        """Debug mode: positions into `entries`."""
        return _select_page(self.raw_index, filters, page, page_size)

    def storage_objects(self, page: Page) -> list[dict[str, Any]]:
        out = []
        for position in page.positions:
            storage = self.visible[position].storage
            assert storage is not None
            out.append(storage)
        return out

    def storage_json(self, page: Page) -> list[bytes]:
        rendered = self.rendered
        return [rendered(position) for position in page.positions]

    def raw_resources(self, page: Page) -> list[dict[str, Any]]:
        entries = self.entries
        return [raw_resource(entries[position]) for position in page.positions]


class MirrorViews:
    """The current `MirrorView` of one mirror, rebuilt when the mirror has changed."""

    def __init__(self, mirror: OfferingMirror, *, render: Callable[[dict[str, Any]], bytes] = compact_json) -> None:
        self.mirror = mirror
        self._render = render
        self._lock = threading.Lock()
        self._view: MirrorView | None = None

    def current(self) -> MirrorView:
        view = self._view
        version = self.mirror.version
        if view is not None and view.version == version:
            return view
        with self._lock:
            view = self._view
            # `entries()` is the mirror's cached tuple: a new one after each change. Read the version first, so a
            # change racing with this read gives a view with an older version number that is rebuilt next time.
            version = self.mirror.version
            entries = self.mirror.entries()
            if view is not None and view.entries is entries:
                if view.version != version:
                    view.version = version
                return view
            view = MirrorView(entries, version=version, render=self._render, previous=view)
            self._view = view
            return view
