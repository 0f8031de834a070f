"""Envelopes and file names of the storage JSON (storage-json spec §4–5). Pure functions, no I/O."""

from __future__ import annotations

import hashlib
import json
import math
import operator
from collections.abc import Iterator, Sequence
from datetime import datetime
from itertools import chain
from typing import Any, Literal

import orjson

from cscs_storage_daemon import APP_VERSION
from cscs_storage_daemon.mapping import StorageObject
from cscs_storage_daemon.numbers import float_writes_alike

OrderType = Literal["create", "update", "terminate"]
ORDER_TYPES: dict[str, OrderType] = {"create": "create", "update": "update", "terminate": "terminate"}


def paginate(*, total: int, page: int, page_size: int) -> dict[str, int]:
    """The `paginate` object over a filtered set of `total` items."""
    pages = max(1, math.ceil(total / page_size)) if total else 1
    return {
        "current": page,
        "limit": page_size,
        "offset": (page - 1) * page_size,
        "pages": pages,
        "total": total,
    }


def envelope(
    resources: Sequence[dict[str, Any]], *, date: datetime, pagination: dict[str, int] | None
) -> dict[str, Any]:
    """The one envelope every file and HTTP response uses; `pagination` None leaves `paginate` out."""
    result: dict[str, Any] = {"storageResources": list(resources)}
    if pagination is not None:
        result["paginate"] = pagination
    return {
        "status": "success",
        "code": 200,
        "meta": {"date": date.isoformat(), "appVersion": APP_VERSION},
        "result": result,
    }


def snapshot_envelope(resources: Sequence[dict[str, Any]], *, date: datetime) -> dict[str, Any]:
    """all.json: every valid resource, one page holding all of them (`limit` 1 when there are none)."""
    n = len(resources)
    return envelope(
        resources,
        date=date,
        pagination={"current": 1, "limit": n or 1, "offset": 0, "pages": 1, "total": n},
    )


def order_envelope(resource: dict[str, Any], *, date: datetime) -> dict[str, Any]:
    """An order file: the envelope with one storage resource and no `paginate`."""
    return envelope([resource], date=date, pagination=None)


def _stamp(date: datetime) -> str:
    return date.strftime("%Y-%m-%d-%H-%M")


def snapshot_file_name(date: datetime) -> str:
    """`{YYYY-MM-DD-HH-MM}-all.json`, `date` already in the offering's time zone."""
    return f"{_stamp(date)}-all.json"


def order_file_name(date: datetime, order_type: str, order_uuid_hex: str) -> str:
    """`{YYYY-MM-DD-HH-MM}-{order_type}_{order_uuid_hex}.json` (the seed promises the order uuid)."""
    kind = ORDER_TYPES.get(order_type.lower())
    if kind is None:
        raise ValueError(f"unknown order type {order_type!r}")
    if len(order_uuid_hex) != 32 or any(c not in "0123456789abcdef" for c in order_uuid_hex):
        raise ValueError(f"order uuid must be 32 lower-case hex digits, got {order_uuid_hex!r}")
    return f"{_stamp(date)}-{kind}_{order_uuid_hex}.json"


def is_snapshot_file_name(name: str) -> bool:
    return name.endswith("-all.json") and len(name) == len("YYYY-MM-DD-HH-MM-all.json")


def render(document: dict[str, Any]) -> bytes:
    """UTF-8, 2-space indent, non-ASCII kept literally, newline at the end.

    The bytes are those of `json.dumps(indent=2, ensure_ascii=False, allow_nan=False)` plus a newline: the pieces
    of `render_pieces` joined. A big all.json is better streamed piece by piece (`OutputWriter.write` takes them).
    """
    result = document.get("result")
    resources = result.get("storageResources") if isinstance(result, dict) else None
    if type(resources) is list and len(resources) <= PIECE_RESOURCES and _orjson_writes_whole(document, resources):
        # An order file or a page of the API: orjson for all of it (the envelope's standard-library rendering
        # alone was most of an order file's cost).
        try:
            return orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n"
        except TypeError:
            pass
    return b"".join(render_pieces(document))


def _orjson_writes_whole(document: dict[str, Any], resources: list[Any]) -> bool:
    """Whether orjson writes `document` (an envelope) exactly as `json.dumps` does: its storage resources are
    checked as `render_pieces` checks them, everything else in full."""
    result = document["result"]
    if not (_STR_TYPE.issuperset(map(type, document)) and _STR_TYPE.issuperset(map(type, result))):
        return False
    shell = [v for k, v in document.items() if k != "result"]
    shell.extend(v for k, v in result.items() if k != "storageResources")
    return _all_written_the_same(shell) and _orjson_writes_the_same(resources)


#: Resources per piece of a rendered all.json: ~1 MB of output (the whole is never in memory at once; pieces this
#: size render faster than larger ones, which outgrow the CPU caches).
PIECE_RESOURCES = 500
_RESOURCES_KEY = b'"storageResources": []'
# A piece is rendered inside two one-key objects, the depth of storageResources in the envelope
# (document → result → storageResources), so each line gets the indentation it has in the whole document; what
# lies between the list's "[" and its closing line is then cut out of it.
_WRAP_HEAD = len(b'{\n  "": {\n    "": [')
_WRAP_TAIL = len(b"\n    ]\n  }\n}")
_CLOSE_LIST = b"\n    ]"


def render_pieces(document: dict[str, Any]) -> Iterator[bytes | memoryview]:
    """`render(document)` in pieces of at most `PIECE_RESOURCES` storage resources each (bytes-like objects).

    The envelope around the resources is written by the standard library (it is small); the resources by orjson,
    about 20 times faster than the standard library (which falls back to its pure-Python encoder whenever `indent`
    is set: 6-8 s for 100 000 resources), for pieces where orjson's bytes are the same: storage objects as
    `map_resource` makes them (see `_orjson_writes_the_same`). Other pieces, and values orjson refuses (integers
    past 64 bits, say), take the standard path, which refuses NaN (`ValueError`) and lone surrogates
    (`UnicodeEncodeError`) — possibly after earlier pieces were produced.
    """
    result = document.get("result")
    resources = result.get("storageResources") if isinstance(result, dict) else None
    if not isinstance(result, dict) or type(resources) is not list or not resources:
        yield _standard(document) + b"\n"
        return
    shell = _standard({**document, "result": {**result, "storageResources": []}}) + b"\n"
    at = shell.find(_RESOURCES_KEY)
    if at < 0 or shell.find(_RESOURCES_KEY, at + 1) >= 0 or not shell[:at].endswith(b"\n    "):
        yield _standard(document) + b"\n"  # not the envelope's layout (a key repeated in meta, say)
        return
    after_list = at + len(_RESOURCES_KEY)
    yield shell[: after_list - 1]  # up to and including the list's "["
    for start in range(0, len(resources), PIECE_RESOURCES):
        piece = resources[start : start + PIECE_RESOURCES]
        wrapped = {"": {"": piece}}
        data = None
        if _orjson_writes_the_same(piece):
            try:
                data = orjson.dumps(wrapped, option=orjson.OPT_INDENT_2)
            except TypeError:
                pass
        if data is None:
            data = _standard(wrapped)
        if start:
            yield b","
        yield memoryview(data)[_WRAP_HEAD : len(data) - _WRAP_TAIL]
    yield _CLOSE_LIST + shell[after_list:]


def _standard(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, indent=2, allow_nan=False).encode("utf-8")


_PLAIN_TYPES = frozenset({str, int, bool, type(None)})
_MAPPED_TYPE: frozenset[type] = frozenset((StorageObject,))
_OBJECT_TYPES: frozenset[type] = frozenset((dict, StorageObject))
_STR_TYPE = frozenset({str})
_MAX_DEPTH = 33
_GET_QUOTAS = operator.itemgetter("quotas")
_GET_QUOTA = operator.itemgetter("quota")
_GET_TARGET = operator.itemgetter("target")
_GET_TARGET_ITEM = operator.itemgetter("targetItem")


def _orjson_writes_the_same(resources: list[Any]) -> bool:
    """Whether orjson's bytes for these storage resources are exactly `json.dumps`'s.

    Strings, integers and floats come out the same except floats that are non-finite (orjson writes `null` where
    `json.dumps` refuses) or of magnitude in (0, 1e-4) (`float_writes_alike`). A `StorageObject` is one whose
    floats `map_resource` found written alike: a list of nothing else needs no look. Of a plain dict, a storage
    object holds floats only in `quotas` and possibly in a target item copied from `backend_metadata`: both are
    checked (`_all_written_the_same`). Other fields of a storage object are trusted to hold no float (the mapping's
    contract); resources that lack `quotas` or `target` are not vouched for.
    """
    if _MAPPED_TYPE.issuperset(map(type, resources)):
        return True
    if len(resources) <= 2 and _few_written_the_same(resources):
        return True  # an order file's resource: the same rules, checked directly (the passes below cost more)
    try:
        quota_lists = list(filter(None, map(_GET_QUOTAS, resources)))
        unique_lists = dict(zip(map(id, quota_lists), quota_lists, strict=True)).values()  # the mapping shares them
        quotas = list(map(_GET_QUOTA, chain.from_iterable(unique_lists)))
        items = filter(None, map(_GET_TARGET_ITEM, filter(None, map(_GET_TARGET, resources))))
        values = list(chain.from_iterable(map(dict.values, items)))
    except (KeyError, TypeError, AttributeError):
        return False
    return _all_written_the_same(quotas) and _all_written_the_same(values)


def _few_written_the_same(resources: list[Any]) -> bool:
    """`_orjson_writes_the_same` for a resource or two, true only when every checked value is a plain one or a
    float both write alike; anything else (a nested value, a missing field) is left to the full check."""
    try:
        for resource in resources:
            quotas = resource["quotas"]
            if quotas:
                for quota in quotas:
                    if not _plain_or_same_float(quota["quota"]):
                        return False
            target = resource["target"]
            if target:
                item = target["targetItem"]
                if item:
                    for value in item.values():
                        if type(value) is dict:  # a user's primaryProject: one level more, no deeper
                            if not _STR_TYPE.issuperset(map(type, value)):
                                return False
                            if not all(map(_plain_or_same_float, value.values())):
                                return False
                        elif not _plain_or_same_float(value):
                            return False
    except (KeyError, TypeError, AttributeError):
        return False
    return True


def _plain_or_same_float(value: Any) -> bool:
    kind = type(value)
    if kind is float:
        return float_writes_alike(value)
    return kind in _PLAIN_TYPES


def _all_written_the_same(values: list[Any]) -> bool:
    """Whether orjson writes these JSON values, and all they hold, as `json.dumps` does.

    A level of nesting at a time, each level's plain values in C-level passes and each container (a user's shared
    `primaryProject`, say) once: most levels hold nothing but strings, integers, booleans and nulls.
    """
    for _ in range(_MAX_DEPTH):
        if _PLAIN_TYPES.issuperset(map(type, values)):
            return True
        others = [v for v in values if type(v) not in _PLAIN_TYPES]
        floats: list[float] = []
        dicts: list[dict[Any, Any]] = []
        lists: list[list[Any]] = []
        for value in dict(zip(map(id, others), others, strict=True)).values():
            kind = type(value)
            if kind is float:
                floats.append(value)
            elif kind is dict:
                dicts.append(value)
            elif kind is list:
                lists.append(value)
            else:
                return False
        if not math.isfinite(sum(floats)):
            return False  # NaN / infinity (or an overflowing sum: the standard path sorts it out)
        if [v for v in floats if -1e-4 < v < 1e-4 and v]:
            return False
        if not _STR_TYPE.issuperset(map(type, chain.from_iterable(dicts))):
            return False  # a key that is not a string
        values = list(chain(chain.from_iterable(map(dict.values, dicts)), chain.from_iterable(lists)))
    return False


def content_key(document: dict[str, Any]) -> bytes:
    """What decides whether a snapshot changed: a digest of everything but `meta.date`.

    A digest, not the serialised content: a 100 000-resource feed would otherwise keep ~170 MB per offering alive
    between regenerations. Only compared with itself, so orjson's compact form serves (the standard library's is
    about 7 times slower), hashed a piece of `PIECE_RESOURCES` resources at a time (no 150 MB string either);
    values orjson refuses take the standard path.
    """
    result = document["result"]
    resources = result.get("storageResources") if isinstance(result, dict) else None
    if type(resources) is not list:
        resources = []
    else:
        result = {**result, "storageResources": len(resources)}
    digest = hashlib.sha256(_compact({"result": result, "status": document["status"], "code": document["code"]}))
    for start in range(0, len(resources), PIECE_RESOURCES):
        digest.update(_compact(resources[start : start + PIECE_RESOURCES]))
    return digest.digest()


def _compact(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")


class RenderedObjects:
    """Storage objects rendered for all.json once each, reused while the same objects come back.

    The mirror keeps a storage object until its resource changes (a change replaces it with a new dict, never edits
    it in place), so between two regenerations most objects are the very same dicts: each is rendered once (the
    bytes it has inside the all.json list, `render_pieces`' layout) with a digest of those bytes, and a regeneration
    joins cached bytes (`pieces`) and hashes 16-byte digests (`key`) instead of rendering and hashing everything.
    Costs the rendered bytes of the current objects in memory (~1.6 KB a resource); `forget` drops them.

    Keyed by identity: an entry holds its object, so an id is never reused while cached; what `prepare` was not
    given is dropped from the cache.
    """

    def __init__(self) -> None:
        self._cache: dict[int, tuple[dict[str, Any], bytes, bytes]] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def forget(self) -> None:
        self._cache = {}

    def prepare(self, document: dict[str, Any]) -> PreparedSnapshot | None:
        """The key and pieces of a snapshot envelope; None when it is not one this renders (the caller takes
        `content_key` and `render_pieces`), or when a value needs the standard library's refusal (NaN, say)."""
        result = document.get("result")
        if not isinstance(result, dict):
            return None
        resources = result.get("storageResources")
        if type(resources) is not list or not resources or not _OBJECT_TYPES.issuperset(map(type, resources)):
            return None
        try:
            shell = _standard({**document, "result": {**result, "storageResources": []}}) + b"\n"
        except (ValueError, TypeError):
            return None
        at = shell.find(_RESOURCES_KEY)
        if at < 0 or shell.find(_RESOURCES_KEY, at + 1) >= 0 or not shell[:at].endswith(b"\n    "):
            return None
        old = self._cache
        ids = list(map(id, resources))
        fresh = [r for r, known in zip(resources, map(old.__contains__, ids), strict=True) if not known]
        try:
            rendered = _render_each(fresh)
        except (ValueError, TypeError, RecursionError):
            return None
        for resource, data in zip(fresh, rendered, strict=True):
            old[id(resource)] = (resource, data, hashlib.blake2b(data, digest_size=16).digest())
        entries = list(map(old.__getitem__, ids))
        self._cache = dict(zip(ids, entries, strict=True))  # only what this document holds
        elements = list(map(_GET_BYTES, entries))
        digest = hashlib.sha256(_compact({"result": {**result, "storageResources": len(resources)}}))
        digest.update(_compact({"status": document.get("status"), "code": document.get("code")}))
        digest.update(b"".join(map(_GET_DIGEST, entries)))
        after_list = at + len(_RESOURCES_KEY)
        return PreparedSnapshot(
            key=b"r" + digest.digest(),
            head=shell[: after_list - 1],
            elements=elements,
            tail=_CLOSE_LIST + shell[after_list:],
        )


_GET_BYTES = operator.itemgetter(1)
_GET_DIGEST = operator.itemgetter(2)


class PreparedSnapshot:
    """An all.json ready to write: `key` (compare with earlier keys of the same `RenderedObjects`) and `pieces`."""

    __slots__ = ("elements", "head", "key", "tail")

    def __init__(self, *, key: bytes, head: bytes, elements: list[bytes], tail: bytes) -> None:
        self.key = key
        self.head = head
        self.elements = elements
        self.tail = tail

    def pieces(self) -> SnapshotPieces:
        """`render_pieces(document)`'s bytes: iterated, in pieces of `PIECE_RESOURCES` resources; or `buffers()`."""
        return SnapshotPieces(self)


class SnapshotPieces:
    """The pieces of a prepared all.json. Iterating joins `PIECE_RESOURCES` resources a piece (what a streamed write
    wants); `buffers` is the same bytes as a flat list of the cached ones, joined by nobody (a vectored write)."""

    __slots__ = ("_prepared",)

    def __init__(self, prepared: PreparedSnapshot) -> None:
        self._prepared = prepared

    def __iter__(self) -> Iterator[bytes]:
        prepared = self._prepared
        yield prepared.head
        elements = prepared.elements
        for start in range(0, len(elements), PIECE_RESOURCES):
            if start:
                yield b","
            yield b",".join(elements[start : start + PIECE_RESOURCES])
        yield prepared.tail

    def buffers(self) -> list[bytes]:
        prepared = self._prepared
        flat = [b","] * (2 * len(prepared.elements))
        flat[0::2] = prepared.elements
        flat[-1] = prepared.tail
        return [prepared.head, *flat]


def _render_each(resources: list[dict[str, Any]]) -> list[bytes]:
    """Each storage object as it appears in the all.json list (its leading newline and indentation included)."""
    if not resources:
        return []
    if _orjson_writes_the_same(resources):
        try:
            return [_element(orjson.dumps({"": {"": [r]}}, option=orjson.OPT_INDENT_2)) for r in resources]
        except TypeError:
            pass
    out = []
    for resource in resources:
        data = None
        if _orjson_writes_the_same([resource]):
            try:
                data = orjson.dumps({"": {"": [resource]}}, option=orjson.OPT_INDENT_2)
            except TypeError:
                pass
        out.append(_element(data if data is not None else _standard({"": {"": [resource]}})))
    return out


def _element(wrapped: bytes) -> bytes:
    return wrapped[_WRAP_HEAD : len(wrapped) - _WRAP_TAIL]
